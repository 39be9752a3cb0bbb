#!/bin/sh
# Failover lifecycle hooks for libvirt (agent.toml [hooks]; docs/failover.md).
#
#   hvr-hooks.sh stop NAME                 shut the domain down (forced after STOP_TIMEOUT_S)
#   hvr-hooks.sh define NAME NBD_SOCKET    define the domain from $HVR_DOMAIN_DIR/NAME.xml,
#                                          its disks pointed at the agent's NBD socket
#   hvr-hooks.sh start NAME                start the domain (nothing if it runs)
#   hvr-hooks.sh undefine NAME             undefine the domain (its images are left alone)
#
# Every action may be repeated: the agent runs a hook again when the operator repeats
# a step that failed.  A non-zero exit stops the failover step; what is printed on
# stderr is shown to the operator.
set -eu

VIRSH=${VIRSH:-virsh}
HVR_DOMAIN_DIR=${HVR_DOMAIN_DIR:-/etc/hvr/domains}
STOP_TIMEOUT_S=${STOP_TIMEOUT_S:-90}

action=${1:?usage: hvr-hooks.sh stop|define|start|undefine NAME [NBD_SOCKET]}
name=${2:?the VM name}

state() {
    "$VIRSH" domstate "$name" 2>/dev/null || echo "undefined"
}

case "$action" in
stop)
    case "$(state)" in
    "shut off"|undefined) exit 0 ;;
    esac
    "$VIRSH" shutdown "$name"
    waited=0
    while [ "$(state)" != "shut off" ]; do
        if [ "$waited" -ge "$STOP_TIMEOUT_S" ]; then
            echo "$name did not shut down within ${STOP_TIMEOUT_S} s: forcing it off" >&2
            "$VIRSH" destroy "$name"
            break
        fi
        sleep 1
        waited=$((waited + 1))
    done
    ;;
define)
    socket=${3:?the NBD socket of the agent}
    xml="$HVR_DOMAIN_DIR/$name.xml"
    if [ ! -r "$xml" ]; then
        echo "no domain XML for $name at $xml (copy deploy/libvirt/domain.xml there)" >&2
        exit 2
    fi
    tmp=$(mktemp)
    trap 'rm -f "$tmp"' EXIT
    sed -e "s|@NAME@|$name|g" -e "s|@NBD_SOCKET@|$socket|g" "$xml" > "$tmp"
    "$VIRSH" define "$tmp"
    ;;
start)
    [ "$(state)" = "running" ] && exit 0
    "$VIRSH" start "$name"
    ;;
undefine)
    [ "$(state)" = "undefined" ] && exit 0
    "$VIRSH" undefine "$name"
    ;;
*)
    echo "unknown action $action (stop, define, start, undefine)" >&2
    exit 2
    ;;
esac
