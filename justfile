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

# Run what the mesh can do so far, end to end, with real processes.
demo:
    cargo build --locked -p istiod-lite -p e2e
    cargo run --locked -q -p e2e --bin demo

# Format the code.
fmt:
    cargo fmt --all
