//! Conformance: the schema we serve against the descriptors embedded in the official SDK (chalkcompute 2.13.11).
//!
//! For every method in `proto/`, the method must exist in the SDK with the same streaming shape and the same
//! request and response types, and every message and enum reachable from them must match field by field: name,
//! number, type, label, and oneof membership. Any mismatch fails with a list of every difference.
//!
//! The SDK's descriptors are read by `tests/conformance/sdk_descriptors.py` in the project's virtualenv
//! (`scripts/sdk-venv.sh` creates it on first use).

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use prost_reflect::{Cardinality, DescriptorPool, EnumDescriptor, FieldDescriptor, Kind, MessageDescriptor};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn sdk_pool() -> DescriptorPool {
    let root = repo_root();
    let python = match std::env::var("COMPUTE_SDK_PYTHON") {
        Ok(p) => p,
        Err(_) => {
            let out = Command::new(root.join("scripts/sdk-venv.sh")).output().expect("running scripts/sdk-venv.sh");
            assert!(
                out.status.success(),
                "could not prepare the SDK virtualenv (scripts/sdk-venv.sh):\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        }
    };
    let out_file = std::env::temp_dir().join(format!("compute-sdk-descriptors-{}.binpb", std::process::id()));
    let out = Command::new(&python)
        .arg(root.join("tests/conformance/sdk_descriptors.py"))
        .arg(&out_file)
        .output()
        .expect("running the SDK descriptor dump");
    assert!(out.status.success(), "sdk_descriptors.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("chalkcompute 2.13.11"), "the pinned SDK must be installed, got: {stderr}");
    let bytes = std::fs::read(&out_file).unwrap();
    let _ = std::fs::remove_file(&out_file);
    DescriptorPool::decode(bytes.as_slice()).expect("the SDK's descriptors decode")
}

fn kind_name(k: &Kind) -> String {
    match k {
        Kind::Message(m) => format!("message {}", m.full_name()),
        Kind::Enum(e) => format!("enum {}", e.full_name()),
        other => format!("{other:?}"),
    }
}

fn oneof_of(f: &FieldDescriptor) -> Option<String> {
    f.containing_oneof().filter(|o| !o.is_synthetic()).map(|o| o.name().to_string())
}

fn label(f: &FieldDescriptor) -> String {
    let card = match f.cardinality() {
        Cardinality::Optional => "optional",
        Cardinality::Required => "required",
        Cardinality::Repeated => "repeated",
    };
    format!("{card}{}", if f.supports_presence() { "+presence" } else { "" })
}

struct Checker {
    sdk: DescriptorPool,
    diffs: Vec<String>,
    seen: HashSet<String>,
    messages: usize,
    enums: usize,
}

impl Checker {
    fn message(&mut self, ours: &MessageDescriptor) {
        if !self.seen.insert(ours.full_name().to_string()) {
            return;
        }
        self.messages += 1;
        let Some(theirs) = self.sdk.get_message_by_name(ours.full_name()) else {
            self.diffs.push(format!("message {} does not exist in the SDK", ours.full_name()));
            return;
        };
        let our_fields: BTreeSet<u32> = ours.fields().map(|f| f.number()).collect();
        let their_fields: BTreeSet<u32> = theirs.fields().map(|f| f.number()).collect();
        for missing in their_fields.difference(&our_fields) {
            let f = theirs.get_field(*missing).unwrap();
            self.diffs.push(format!("{}: we lack field {} = {}", ours.full_name(), f.name(), missing));
        }
        for f in ours.fields() {
            let Some(t) = theirs.get_field(f.number()) else {
                self.diffs.push(format!("{}: field {} = {} is not in the SDK", ours.full_name(), f.name(), f.number()));
                continue;
            };
            let here = format!("{}.{} (= {})", ours.full_name(), f.name(), f.number());
            if f.name() != t.name() {
                self.diffs.push(format!("{here}: the SDK names it {}", t.name()));
            }
            if kind_name(&f.kind()) != kind_name(&t.kind()) {
                self.diffs.push(format!("{here}: type {} vs SDK {}", kind_name(&f.kind()), kind_name(&t.kind())));
            }
            if label(&f) != label(&t) {
                self.diffs.push(format!("{here}: label {} vs SDK {}", label(&f), label(&t)));
            }
            if oneof_of(&f) != oneof_of(&t) {
                self.diffs.push(format!("{here}: oneof {:?} vs SDK {:?}", oneof_of(&f), oneof_of(&t)));
            }
            if f.is_map() != t.is_map() || f.is_packed() != t.is_packed() {
                self.diffs.push(format!("{here}: map/packed encoding differs"));
            }
            match f.kind() {
                Kind::Message(m) => self.message(&m),
                Kind::Enum(e) => self.enumeration(&e),
                _ => {}
            }
        }
    }

    fn enumeration(&mut self, ours: &EnumDescriptor) {
        if !self.seen.insert(ours.full_name().to_string()) {
            return;
        }
        self.enums += 1;
        let Some(theirs) = self.sdk.get_enum_by_name(ours.full_name()) else {
            self.diffs.push(format!("enum {} does not exist in the SDK", ours.full_name()));
            return;
        };
        let a: BTreeSet<(String, i32)> = ours.values().map(|v| (v.name().to_string(), v.number())).collect();
        let b: BTreeSet<(String, i32)> = theirs.values().map(|v| (v.name().to_string(), v.number())).collect();
        if a != b {
            self.diffs.push(format!("enum {}: values {:?} vs SDK {:?}", ours.full_name(), a, b));
        }
    }
}

#[test]
fn served_schema_matches_the_sdk() {
    let sdk = sdk_pool();
    let ours = compute_proto::descriptor_pool();
    let mut checker = Checker { sdk: sdk.clone(), diffs: Vec::new(), seen: HashSet::new(), messages: 0, enums: 0 };
    let mut methods = 0;
    for service in ours.services() {
        let Some(their_service) = sdk.get_service_by_name(service.full_name()) else {
            checker.diffs.push(format!("service {} does not exist in the SDK", service.full_name()));
            continue;
        };
        for m in service.methods() {
            methods += 1;
            let path = format!("/{}/{}", service.full_name(), m.name());
            let Some(t) = their_service.methods().find(|t| t.name() == m.name()) else {
                checker.diffs.push(format!("{path} does not exist in the SDK"));
                continue;
            };
            if (m.is_client_streaming(), m.is_server_streaming()) != (t.is_client_streaming(), t.is_server_streaming())
            {
                checker.diffs.push(format!("{path}: streaming shape differs from the SDK"));
            }
            if m.input().full_name() != t.input().full_name() || m.output().full_name() != t.output().full_name() {
                checker.diffs.push(format!(
                    "{path}: {} -> {} vs SDK {} -> {}",
                    m.input().full_name(),
                    m.output().full_name(),
                    t.input().full_name(),
                    t.output().full_name()
                ));
            }
            checker.message(&m.input());
            checker.message(&m.output());
        }
    }
    assert!(checker.diffs.is_empty(), "{} mismatches with the SDK:\n{}", checker.diffs.len(), checker.diffs.join("\n"));
    assert!(methods >= 50, "only {methods} methods checked");
    eprintln!("conformance: {methods} methods, {} messages, {} enums match the SDK", checker.messages, checker.enums);
}
