//! `crdgen DIR`: writes the mesh's CRDs into DIR (see `istiod_lite::crdgen`).

use std::process::ExitCode;

fn main() -> ExitCode {
    let Some(dir) = std::env::args().nth(1) else {
        eprintln!("usage: crdgen DIR");
        return ExitCode::from(2);
    };
    for (file, crd) in istiod_lite::crdgen::crds() {
        let path = std::path::Path::new(&dir).join(file);
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
    ExitCode::SUCCESS
}
