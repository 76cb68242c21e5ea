//! The CRDs in `manifests/crds/` are the ones the code reads objects with:
//! regenerated here and compared byte for byte (`just manifests` rewrites
//! them after a change to the types).

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crds");
    let mut stale = Vec::new();
    for (file, crd) in istiod_lite::crdgen::crds() {
        let want = istiod_lite::crdgen::to_yaml(&crd).unwrap();
        let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
        if have != want {
            stale.push(file);
        }
    }
    assert!(
        stale.is_empty(),
        "manifests/crds is out of date for {stale:?}: run `just manifests`"
    );
    // And nothing else is in there.
    let mut listed: Vec<String> = istiod_lite::crdgen::crds()
        .into_iter()
        .map(|(f, _)| f.to_string())
        .collect();
    listed.push("kustomization.yaml".into());
    for e in std::fs::read_dir(&dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(
            listed.contains(&name),
            "manifests/crds/{name} is not generated"
        );
    }
}

#[test]
fn every_crd_is_structural_and_served() {
    for (file, crd) in istiod_lite::crdgen::crds() {
        assert!(!crd.spec.versions.is_empty(), "{file}");
        for v in &crd.spec.versions {
            assert!(v.served && v.storage, "{file}: {}", v.name);
            let schema = v
                .schema
                .as_ref()
                .and_then(|s| s.open_api_v3_schema.as_ref());
            assert!(
                schema.is_some_and(|s| s.type_.as_deref() == Some("object")),
                "{file}"
            );
        }
    }
}
