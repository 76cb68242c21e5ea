//! A DENY on a path holds for every way of spelling that path that the
//! normalization option makes equal to it: random paths, random encodings
//! of them, the real normalization and the real policy evaluator. A seeded
//! loop (set PATH_PROPERTY_SEED to explore others); a failure prints the
//! seed, the path and the encoding.

use http::HeaderMap;
use mesh_proto::mesh::waypoint as pb;
use waypoint::authz::{Policy, RequestAttrs, evaluate};
use waypoint::normalize::{PathNormalization, normalize_path};

const CASES: usize = 3000;

/// Characters a path segment is made of: RFC 3986's unreserved set.
const UNRESERVED: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~";

fn seed() -> u64 {
    std::env::var("PATH_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0a7b)
}

fn segment(rng: &mut fastrand::Rng) -> String {
    loop {
        let len = rng.usize(1..7);
        let s: String = (0..len)
            .map(|_| char::from(UNRESERVED[rng.usize(..UNRESERVED.len())]))
            .collect();
        // "." and ".." are dot segments, not names.
        if s != "." && s != ".." {
            return s;
        }
    }
}

/// A path already in normal form: single slashes, no dot segments.
fn canonical(rng: &mut fastrand::Rng) -> (Vec<String>, bool) {
    let segs = (0..rng.usize(1..5)).map(|_| segment(rng)).collect();
    (segs, rng.u8(..4) == 0)
}

fn hex_digit(rng: &mut fastrand::Rng, d: u8) -> char {
    let c = char::from(b"0123456789abcdef"[usize::from(d)]);
    if rng.bool() {
        c.to_ascii_uppercase()
    } else {
        c
    }
}

fn pct(rng: &mut fastrand::Rng, b: u8) -> String {
    format!("%{}{}", hex_digit(rng, b >> 4), hex_digit(rng, b & 15))
}

/// A segment with some of its characters percent-encoded, in either case.
fn encode_segment(rng: &mut fastrand::Rng, s: &str) -> String {
    s.bytes()
        .map(|b| {
            if rng.u8(..3) == 0 {
                pct(rng, b)
            } else {
                char::from(b).to_string()
            }
        })
        .collect()
}

/// One separator as `how` reads it as a single `/`. `before_dots`: the
/// next segment is `..`, which (dots resolved before slashes are merged,
/// Istio's order) would step back into an empty segment after `//`.
fn separator(
    rng: &mut fastrand::Rng,
    how: PathNormalization,
    first: bool,
    before_dots: bool,
) -> String {
    let mut choices = vec!["/"];
    if !first {
        choices.push("\\");
    }
    if how != PathNormalization::Base && !before_dots {
        choices.push("//");
        if !first {
            choices.push("\\/");
        }
    }
    if how == PathNormalization::DecodeAndMergeSlashes && !first {
        choices.extend(["%2F", "%2f", "%5C", "%5c"]);
    }
    choices[rng.usize(..choices.len())].to_string()
}

fn dots(rng: &mut fastrand::Rng, n: usize) -> String {
    (0..n)
        .map(|_| {
            if rng.bool() {
                ".".to_string()
            } else {
                pct(rng, b'.')
            }
        })
        .collect()
}

/// A random spelling of the path that `how` normalizes back to it.
fn encode(
    rng: &mut fastrand::Rng,
    segs: &[String],
    trailing: bool,
    how: PathNormalization,
) -> String {
    // Segments as sent, each real one maybe preceded by `.` or `x/..`;
    // true marks a `..`.
    let mut sent: Vec<(String, bool)> = Vec::new();
    for s in segs {
        match rng.u8(..4) {
            0 => sent.push((dots(rng, 1), false)),
            1 => {
                let x = segment(rng);
                sent.push((encode_segment(rng, &x), false));
                sent.push((dots(rng, 2), true));
            }
            _ => {}
        }
        sent.push((encode_segment(rng, s), false));
    }
    let mut out = String::new();
    for (i, (s, dotdot)) in sent.iter().enumerate() {
        out.push_str(&separator(rng, how, i == 0, *dotdot));
        out.push_str(s);
    }
    if trailing {
        out.push_str(&separator(rng, how, false, false));
    }
    out
}

fn deny(paths: Vec<String>) -> Policy {
    Policy::compile(&pb::Policy {
        name: "shop/deny".into(),
        action: pb::PolicyAction::Deny as i32,
        rules: vec![pb::PolicyRule {
            to: vec![pb::PolicyOperation {
                paths,
                ..Default::default()
            }],
            ..Default::default()
        }],
        dry_run: false,
        provider: None,
    })
    .expect("compiles")
}

fn allowed(policy: &Policy, path: &str, headers: &HeaderMap) -> bool {
    evaluate(
        std::slice::from_ref(policy),
        &RequestAttrs {
            http: true,
            principal: Some("cluster.local/ns/shop/sa/client"),
            namespace: Some("shop"),
            source_ip: std::net::IpAddr::from([10, 1, 2, 3]),
            source_addrs: &[],
            host: "vault.shop.svc.cluster.local",
            port: 80,
            method: "GET",
            path,
            headers,
        },
    )
    .is_allowed()
}

#[test]
fn a_deny_on_a_path_denies_every_spelling_of_it() {
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let h = HeaderMap::new();
    for how in [
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        for case in 0..CASES {
            let (segs, trailing) = canonical(&mut rng);
            let path = format!("/{}{}", segs.join("/"), if trailing { "/" } else { "" });
            let sent = encode(&mut rng, &segs, trailing, how);
            let ctx = format!("seed {seed}, {how:?} case {case}: {path:?} sent as {sent:?}");
            let seen = normalize_path(&sent, how).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            assert_eq!(seen, path, "{ctx}");
            assert_eq!(
                normalize_path(&seen, how).ok().as_deref(),
                Some(path.as_str()),
                "{ctx}: normalizing twice"
            );
            let exact = deny(vec![path.clone()]);
            let prefix = deny(vec![format!("/{}*", segs[0])]);
            assert!(!allowed(&exact, &seen, &h), "{ctx}: exact DENY");
            assert!(!allowed(&prefix, &seen, &h), "{ctx}: prefix DENY");
        }
    }
}

/// Without normalization most of those spellings pass the same DENY: the
/// property above is not one any function would satisfy.
#[test]
fn without_normalization_the_spellings_get_past_the_deny() {
    let mut rng = fastrand::Rng::with_seed(seed());
    let h = HeaderMap::new();
    let mut passed = 0;
    for _ in 0..CASES {
        let (segs, trailing) = canonical(&mut rng);
        let path = format!("/{}{}", segs.join("/"), if trailing { "/" } else { "" });
        let sent = encode(
            &mut rng,
            &segs,
            trailing,
            PathNormalization::DecodeAndMergeSlashes,
        );
        let seen = normalize_path(&sent, PathNormalization::None).expect("well formed");
        assert_eq!(seen, sent);
        if allowed(&deny(vec![path]), &seen, &h) {
            passed += 1;
        }
    }
    assert!(passed > CASES / 2, "{passed} of {CASES}");
}

/// Any input: never a panic; under every option but NONE the result has
/// no backslash, no dot segment and no escape of an unreserved character,
/// and normalizing it again changes nothing.
#[test]
fn any_path_normalizes_to_a_fixed_point() {
    let mut rng = fastrand::Rng::with_seed(seed() ^ 0xa11);
    let alphabet: &[&str] = &[
        "/", "/", "\\", ".", "..", "a", "B", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "%61",
        "%25", "%3f", "%7e", "%00", "%", "%z", "~", "é", "//",
    ];
    for how in [
        PathNormalization::None,
        PathNormalization::Base,
        PathNormalization::MergeSlashes,
        PathNormalization::DecodeAndMergeSlashes,
    ] {
        for _ in 0..CASES {
            let mut p = String::from("/");
            for _ in 0..rng.usize(0..12) {
                p.push_str(alphabet[rng.usize(..alphabet.len())]);
            }
            let Ok(once) = normalize_path(&p, how) else {
                assert!(p.contains('%'), "{p:?} refused");
                continue;
            };
            let twice = normalize_path(&once, how).expect("a normalized path is accepted");
            assert_eq!(once, twice, "{how:?}: {p:?}");
            if how == PathNormalization::None {
                assert_eq!(once, p);
                continue;
            }
            assert!(once.starts_with('/'), "{how:?}: {p:?} -> {once:?}");
            assert!(!once.contains('\\'), "{how:?}: {p:?} -> {once:?}");
            for seg in once.split('/') {
                assert!(seg != "." && seg != "..", "{how:?}: {p:?} -> {once:?}");
            }
            assert!(
                !once.to_ascii_lowercase().contains("%2e"),
                "{how:?}: {p:?} -> {once:?}"
            );
            assert!(!once.contains("%61"), "{how:?}: {p:?} -> {once:?}");
            if how != PathNormalization::Base {
                assert!(!once.contains("//"), "{how:?}: {p:?} -> {once:?}");
            }
        }
    }
}
