# The NeuroTrALE precomputed server: serves /data on port 9000 with a pool of worker
# processes. Build and run (see README.md, "Container"):
#
#   docker build -t neurotrale .
#   docker run -p 9000:9000 -v /host/data:/data neurotrale --workers 15
#   apptainer build neurotrale.sif docker-daemon://neurotrale:latest
#   apptainer run --bind /host/data:/data neurotrale.sif /apps/entrypoint.sh --workers 15
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PRECOMPUTED_PATH=/data

WORKDIR /src
# The dependencies first, in a layer of their own (the install_requires of setup.cfg): a change
# to the code does not download them again.
COPY pyproject.toml setup.cfg ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); print(c['options']['install_requires'])" > requirements.txt \
    && pip install --no-cache-dir -r requirements.txt
COPY README.md ./
COPY neurotrale_twisted ./neurotrale_twisted
COPY twisted ./twisted
# Then the package, and Twisted's plugin cache, written while the installation is still
# writable: the server's user cannot write it, and an apptainer image is read-only.
RUN pip install --no-cache-dir --no-deps . \
    && pip check \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && rm -rf /src

# The server runs as this user, never as root; give it the uid that owns the data on the
# host with `--build-arg UID=...` (or `docker run --user`). It comes after the installation,
# so another uid rebuilds only the layers below.
ARG UID=1000
RUN groupadd --system --gid "${UID}" neurotrale \
    && useradd --system --uid "${UID}" --gid neurotrale --home-dir /apps --no-create-home \
        --shell /usr/sbin/nologin neurotrale \
    && mkdir -p /data \
    && chown neurotrale:neurotrale /data

WORKDIR /apps
COPY --chmod=755 contrib/docker/entrypoint.sh /apps/entrypoint.sh
COPY --chmod=644 contrib/docker/healthcheck.py /apps/healthcheck.py

USER ${UID}:${UID}
EXPOSE 9000
VOLUME /data
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "/apps/healthcheck.py"]
ENTRYPOINT ["/apps/entrypoint.sh"]
