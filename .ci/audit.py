"""Audit the installed dependency set with pip-audit (PyPI's vulnerability data).

Prints every known vulnerability, and fails when one has a fixed version to upgrade to.
Vulnerabilities without a fix are reported but cannot be acted on, so they do not fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    report = Path(tmp) / "audit.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip_audit",
            "--progress-spinner",
            "off",
            "--skip-editable",
            "-f",
            "json",
            "-o",
            str(report),
        ],
        capture_output=True,
        text=True,
    )
    if not report.exists():
        print(f"pip-audit could not run (exit {run.returncode}):\n{run.stderr}", file=sys.stderr)
        sys.exit(1)
    document = json.loads(report.read_text())

fixable = 0
dependencies = document["dependencies"]
for dependency in dependencies:
    for vuln in dependency.get("vulns", []):
        fixes = ", ".join(vuln.get("fix_versions") or []) or "no fix yet"
        print(f"{dependency['name']} {dependency.get('version')}: {vuln['id']} (fixed in: {fixes})")
        fixable += bool(vuln.get("fix_versions"))
print(f"pip-audit: {len(dependencies)} packages audited, {fixable} vulnerabilities with a fix")
sys.exit(1 if fixable else 0)
