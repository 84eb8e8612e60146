#!/bin/sh
# The container's entry point, installed as /apps/entrypoint.sh. It keeps the contract of the
# deployment it replaces:
#
#   docker run -p 9000:9000 -v /host/data:/data IMAGE --workers 15 --port 9000
#   apptainer run --bind /host/data:/data image.sif /apps/entrypoint.sh --workers 15
#
# --workers N (default: the CPUs the container may use, as `twistd neurotrale` counts them) and
# --port N (default 9000) are taken here; every other argument
# goes to `twistd neurotrale` (see `twistd neurotrale --help`), which refuses an unknown one
# at once with a message and a non-zero exit. The server runs in the foreground as this
# process (exec), so `docker stop` (SIGTERM) reaches it and stops it gracefully.
set -eu

usage() {
    echo "usage: entrypoint.sh [--workers N] [--port N] [twistd neurotrale options...]" >&2
    echo "entrypoint.sh: $1" >&2
    exit 2
}

positive() {
    case "$2" in
        '' | *[!0-9]* | 0 | 0*) usage "$1 needs a positive integer, not '$2'" ;;
    esac
}

# `apptainer run image.sif /apps/entrypoint.sh ARGS` runs the image's entry point with
# "/apps/entrypoint.sh ARGS" as its arguments: skip our own name.
case "${1:-}" in
    "$0" | /apps/entrypoint.sh) shift ;;
esac

workers="${NEUROTRALE_WORKERS:-}"
port="${NEUROTRALE_PORT:-9000}"
listen_given=no
port_given=no
count=$#
while [ "$count" -gt 0 ]; do
    argument="$1"
    shift
    count=$((count - 1))
    case "$argument" in
        --workers | -w | --port)
            [ "$count" -gt 0 ] || usage "$argument needs a value"
            value="$1"
            shift
            count=$((count - 1))
            ;;
        --workers=* | --port=*)
            value="${argument#*=}"
            argument="${argument%%=*}"
            ;;
        *)
            case "$argument" in
                --listen | --listen=*) listen_given=yes ;;
            esac
            set -- "$@" "$argument" # kept, in order, for twistd
            continue
            ;;
    esac
    positive "$argument" "$value"
    case "$argument" in
        --port)
            port="$value"
            port_given=yes
            ;;
        *) workers="$value" ;;
    esac
done

[ -z "$workers" ] || positive --workers "$workers"
positive --port "$port"
# --listen replaces the default port; --port adds to it.
if [ "$listen_given" = no ] || [ "$port_given" = yes ]; then
    set -- --listen "tcp:$port" "$@"
fi

# Without --workers the server sizes its pool to the CPUs it may use (affinity, cgroup quota).
if [ -n "$workers" ]; then
    set -- --workers "$workers" "$@"
fi
exec twistd --nodaemon --pidfile= neurotrale --path "${PRECOMPUTED_PATH:-/data}" "$@"
