# The mesh's tasks. `just` lists them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# List the recipes.
default:
    @just --list

# Format check, lints, then every test.
test:
    cargo fmt --all -- --check
    cargo clippy --workspace --all-targets --locked -- -D warnings
    cargo build --workspace --bins --locked
    cargo test --workspace --locked
    # A tiny run of the benchmark harness, so it cannot rot.
    ./target/debug/bench --smoke --out-dir target/bench

# Run what the mesh can do so far, end to end, with real processes.
demo:
    cargo build --locked -p istiod-lite -p e2e
    cargo run --locked -q -p e2e --bin demo

# Measure the mesh (release build): the controller at scale, so far.
bench *ARGS:
    cargo build --release --locked -p istiod-lite -p e2e
    ./target/release/bench {{ARGS}}

# Format the code.
fmt:
    cargo fmt --all
