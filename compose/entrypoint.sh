#!/bin/sh
# The container's entrypoint: the first start (idempotent), then the server.
#
#   transmural-entrypoint registry [--invite NODE_ID:ORG_ID:ORG_NAME ...]
#   transmural-entrypoint node NODE_ID [bootstrap node options ...]
#
# The first start is `transmural-admin bootstrap`, the same code devnet joins
# its nodes with (tools/bootstrap.py): the registry makes its network and
# writes an invite token into the invites folder for each node not yet
# invited; a node waits for its token, joins and writes node.toml. On a
# restart both keep everything they have and the server starts as before.
# Options after the role (and node id) go to `bootstrap`.
set -eu
umask 077

DATA="${TRANSMURAL_DATA:-/data}"
INVITES="${TRANSMURAL_INVITES:-/invites}"
REGISTRY_HOST="${TRANSMURAL_REGISTRY_HOST:-registry}"
TOKEN_WAIT_S="${TRANSMURAL_TOKEN_WAIT_S:-300}"
REGISTRY_PORT=7000
JOIN_PORT=7001
PEER_PORT=7100
GATEWAY_PORT=7200

usage() {
    echo "usage: transmural-entrypoint registry [--invite NODE_ID:ORG_ID:ORG_NAME ...]" >&2
    echo "       transmural-entrypoint node NODE_ID [options]" >&2
    exit 2
}

[ $# -ge 1 ] || usage
role="$1"
shift

case "$role" in
registry)
    transmural-admin bootstrap registry --data "$DATA" --invites-dir "$INVITES" --join-address "$REGISTRY_HOST:$JOIN_PORT" "$@"
    exec transmural-registry serve --network-dir "$DATA/network" --db "$DATA/registry.db" --listen "0.0.0.0:$REGISTRY_PORT" --join-listen "0.0.0.0:$JOIN_PORT"
    ;;
node)
    [ $# -ge 1 ] || usage
    node_id="$1"
    shift
    token="$INVITES/$node_id.token"
    waited=0
    # Only a node that has not joined needs its token.
    while [ ! -f "$DATA/node.toml" ] && [ ! -s "$token" ]; do
        if [ "$waited" -ge "$TOKEN_WAIT_S" ]; then
            echo "transmural-entrypoint: no invite token $token after $TOKEN_WAIT_S s" >&2
            exit 1
        fi
        [ "$waited" -gt 0 ] || echo "waiting for the invite token $token"
        sleep 1
        waited=$((waited + 1))
    done
    # The peer port listens on the node's own name: the registry's directory
    # hands that address to the other nodes, which dial it.
    transmural-admin bootstrap node --data "$DATA" --token-file "$token" --node-id "$node_id" --listen "$node_id:$PEER_PORT" --gateway-listen "0.0.0.0:$GATEWAY_PORT" --wait 60 "$@"
    exec transmural-node serve --config "$DATA/node.toml"
    ;;
*)
    usage
    ;;
esac
