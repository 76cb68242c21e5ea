//! `crdgen DIR`: writes the mesh's CRDs into DIR/crds and the Gateway API
//! CRDs (for clusters without them) into DIR/gateway-api (see
//! `istiod_lite::crdgen`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: crdgen MANIFESTS_DIR");
        return ExitCode::from(2);
    };
    let sets = [
        ("crds", istiod_lite::crdgen::crds()),
        ("gateway-api", istiod_lite::crdgen::gateway_api_crds()),
    ];
    for (sub, crds) in sets {
        for (file, crd) in crds {
            let path = std::path::Path::new(&dir).join(sub).join(file);
            let text = match istiod_lite::crdgen::to_yaml(&crd) {
                Ok(t) => t,
                Err(e) => {
                    eprintln!("{file}: {e}");
                    return ExitCode::FAILURE;
                }
            };
            if let Err(e) = std::fs::write(&path, text) {
                eprintln!("{}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            println!("wrote {}", path.display());
        }
    }
    ExitCode::SUCCESS
}
