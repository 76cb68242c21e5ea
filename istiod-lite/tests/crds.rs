//! The CRDs in `manifests/crds/` are the ones the code reads objects with:
//! regenerated here and compared byte for byte (`just manifests` rewrites
//! them after a change to the types).

type Crd =
    k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// (directory under manifests/, its CRDs).
fn sets() -> [(&'static str, Vec<(&'static str, Crd)>); 2] {
    [
        ("crds", istiod_lite::crdgen::crds()),
        ("gateway-api", istiod_lite::crdgen::gateway_api_crds()),
    ]
}

fn every_crd() -> Vec<(&'static str, Crd)> {
    sets().into_iter().flat_map(|(_, c)| c).collect()
}

#[test]
fn committed_crds_match_the_rust_types() {
    for (sub, crds) in sets() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../manifests")
            .join(sub);
        let mut stale = Vec::new();
        for (file, crd) in &crds {
            let want = istiod_lite::crdgen::to_yaml(crd).unwrap();
            let have = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            if have != want {
                stale.push(file);
            }
        }
        assert!(
            stale.is_empty(),
            "manifests/{sub} is out of date for {stale:?}: run `just manifests`"
        );
        // And nothing else is in there.
        let mut listed: Vec<String> = crds.iter().map(|(f, _)| f.to_string()).collect();
        listed.push("kustomization.yaml".into());
        for e in std::fs::read_dir(&dir).unwrap() {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            assert!(
                listed.contains(&name),
                "manifests/{sub}/{name} is not generated"
            );
        }
    }
}

#[test]
fn every_crd_is_structural_and_served() {
    for (file, crd) in every_crd() {
        assert!(!crd.spec.versions.is_empty(), "{file}");
        let stored = crd.spec.versions.iter().filter(|v| v.storage).count();
        assert_eq!(stored, 1, "{file}: one storage version");
        for v in &crd.spec.versions {
            assert!(v.served, "{file}: {}", v.name);
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

/// Our Gateway API CRDs serve what the upstream standard channel serves
/// (v1, stored, and v1beta1; GRPCRoute only ever had v1 there), so clients
/// of either version keep working whichever set a cluster has.
#[test]
fn the_gateway_api_crds_are_shaped_like_upstreams() {
    let crds = istiod_lite::crdgen::gateway_api_crds();
    let kinds: Vec<&str> = crds
        .iter()
        .map(|(_, c)| c.spec.names.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "GatewayClass",
            "Gateway",
            "HTTPRoute",
            "GRPCRoute",
            "ReferenceGrant"
        ]
    );
    for (file, crd) in &crds {
        let versions: Vec<(&str, bool)> = crd
            .spec
            .versions
            .iter()
            .map(|v| (v.name.as_str(), v.storage))
            .collect();
        if crd.spec.names.kind == "GRPCRoute" {
            assert_eq!(versions, [("v1", true)], "{file}");
        } else {
            assert_eq!(versions, [("v1", true), ("v1beta1", false)], "{file}");
        }
    }
}

/// The formats the API server knows for CRD schemas (any other is warned
/// about on apply, and means nothing to validation).
const KNOWN_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "datetime",
    "password",
    "duration",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
    "uuid3",
    "uuid4",
    "uuid5",
];

/// Walks a schema for what a structural schema may not hold.
fn not_structural(at: &str, v: &serde_json::Value, found: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                let here = format!("{at}.{k}");
                match k.as_str() {
                    "patternProperties" | "dependencies" | "definitions" | "$ref" => {
                        found.push(format!("{here}: not allowed in a structural schema"))
                    }
                    "format" => {
                        if let Some(f) = child.as_str()
                            && !KNOWN_FORMATS.contains(&f)
                        {
                            found.push(format!("{here}: unknown format {f:?}"));
                        }
                    }
                    _ => {}
                }
                // `properties` and `x-kubernetes-*` names are field names,
                // not keywords: only their values are schemas.
                not_structural(&here, child, found);
            }
        }
        serde_json::Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                not_structural(&format!("{at}[{i}]"), child, found);
            }
        }
        _ => {}
    }
}

/// What the API server checks on create, offline: a structural schema
/// (no patternProperties, known formats only) and, for the protected
/// groups (`*.k8s.io`, `*.kubernetes.io`), the approval annotation.
#[test]
fn every_crd_is_accepted_by_a_real_api_server() {
    let mut problems = Vec::new();
    for (file, crd) in every_crd() {
        let group = &crd.spec.group;
        let protected = group.ends_with(".k8s.io") || group.ends_with(".kubernetes.io");
        let approved = crd
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get("api-approved.kubernetes.io"))
            .is_some_and(|v| !v.is_empty());
        if protected && !approved {
            problems.push(format!(
                "{file}: group {group} needs the api-approved.kubernetes.io annotation"
            ));
        }
        for v in &crd.spec.versions {
            let schema = serde_json::to_value(&v.schema).unwrap();
            let mut found = Vec::new();
            not_structural(&v.name, &schema, &mut found);
            problems.extend(found.into_iter().map(|f| format!("{file}: {f}")));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}
