//! Writes the seed corpora `fuzz/corpus/TARGET/` from real updates and the fixture scenes
//! (`fuzz/fixtures/`, copies of `../shared/fixtures`).
//!
//! `cargo run --manifest-path fuzz/Cargo.toml --example gen_corpus`
//!
//! Each run replaces the five directories. yrs writes `Any` maps in `HashMap` order, so two
//! runs differ byte-wise (not in meaning).

use std::fs;
use std::path::{Path, PathBuf};

use collab_core::protocol::yjs;
use optiverse_collab_fuzz::scenarios::untrusted::{self, *};
use optiverse_collab_fuzz::scenarios::util::fixture_scenes;
use serde_json::json;
use yrs::sync::awareness::{AwarenessUpdate, AwarenessUpdateEntry};
use yrs::updates::encoder::Encode;
use yrs::{ClientID, ReadTxn, StateVector, Transact};

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

struct Corpus {
    dir: PathBuf,
    files: usize,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Corpus {
        let dir = root.join(target);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        Corpus { dir, files: 0 }
    }

    fn add(&mut self, name: &str, bytes: &[u8]) {
        self.files += 1;
        fs::write(self.dir.join(format!("{:03}-{name}", self.files)), bytes).unwrap();
    }

    fn with_mode(&mut self, name: &str, mode: u8, payload: &[u8]) {
        self.add(name, &[&[mode][..], payload].concat());
    }
}

fn awareness(entries: &[(u64, u32, &str)]) -> Vec<u8> {
    AwarenessUpdate {
        clients: entries
            .iter()
            .map(|(id, clock, json)| {
                let entry = AwarenessUpdateEntry {
                    clock: *clock,
                    json: (*json).into(),
                };
                (ClientID::new(*id), entry)
            })
            .collect(),
    }
    .encode_v1()
}

/// Pseudo-random inputs for the `arbitrary` script targets.
fn random_inputs(corpus: &mut Corpus, seed: u64) {
    let mut state = seed;
    for (i, len) in [32usize, 64, 128, 256, 512, 1024, 1536, 2048, 3072, 4096]
        .into_iter()
        .enumerate()
    {
        let bytes: Vec<u8> = (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect();
        corpus.add(&format!("random-{i}-{len}"), &bytes);
    }
}

fn text_frames() -> Vec<(String, String)> {
    let mut out = vec![
        ("ping".to_owned(), r#"{"type":"ping"}"#.to_owned()),
        (
            "sync-request".into(),
            r#"{"type":"sync:request","user_id":"u"}"#.into(),
        ),
        ("bad-json".into(), r#"{"type":"command","#.into()),
        ("not-object".into(), "[1,2,3]".into()),
        ("unknown-type".into(), r#"{"type":"dance"}"#.into()),
        (
            "bad-action".into(),
            r#"{"type":"command","command":{"action":"fly","item_id":"a","data":{}}}"#.into(),
        ),
        (
            "deep".into(),
            format!(
                r#"{{"type":"command","command":{{"action":"add_item","item_id":"a","data":{{"x":{}1{}}}}}}}"#,
                "[".repeat(40),
                "]".repeat(40)
            ),
        ),
    ];
    for (s, scene) in fixture_scenes().iter().enumerate() {
        out.push((
            format!("upload-{s}"),
            json!({"type": "sync:full_state", "state": {"items": scene}}).to_string(),
        ));
        for (i, item) in scene.iter().enumerate().take(2) {
            let uuid = item["item_uuid"].as_str().unwrap_or("u");
            let kind = item["_type"].as_str().unwrap_or("component");
            for action in ["add_item", "move_item", "update_item", "remove_item"] {
                let data = if action == "remove_item" {
                    json!({})
                } else {
                    item.clone()
                };
                let command = json!({
                    "type": "command",
                    "command": {"action": action, "item_type": kind, "item_id": uuid, "data": data},
                    "timestamp": "2026-11-25T19:22:01.123Z",
                    "user_id": "alice",
                });
                if s < 2 || action == "add_item" {
                    out.push((format!("{action}-{s}-{i}"), command.to_string()));
                }
            }
        }
    }
    out
}

fn main() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let seed = untrusted::seed_update().to_vec();
    let (a, b) = seed_writers();
    let seed_sv = a.transact().state_vector().encode_v1();
    let updates = continuing_updates();
    let b_sv = b.transact().state_vector().encode_v1();
    let merged = yrs::merge_updates_v1(updates.iter().map(|(_, u)| u.as_slice())).unwrap();
    let partial_sv = {
        let mut sv = StateVector::default();
        sv.set_max(ClientID::new(SEED_CLIENTS[0]), 5);
        sv.encode_v1()
    };
    let aw_seed = seed_awareness();
    let aw_more = awareness(&[
        (7, 1, r#"{"cursor":{"x":1}}"#),
        (SEED_CLIENTS[0], 4, "null"),
    ]);
    let aw_removal = awareness(&[(SEED_CLIENTS[0], 3, "null")]);

    // untrusted_update
    let mut c = Corpus::new(&root, "untrusted_update");
    c.with_mode("update-seed", MODE_UPDATE, &seed);
    for (name, u) in &updates {
        c.with_mode(&format!("update-{name}"), MODE_UPDATE, u);
        c.with_mode(&format!("scene-{name}"), MODE_SCENE, u);
    }
    c.with_mode("update-merged", MODE_UPDATE, &merged);
    c.with_mode("scene-merged", MODE_SCENE, &merged);
    c.with_mode("empty-doc-seed", MODE_EMPTY_DOC, &seed);
    c.with_mode("empty-doc-merged", MODE_EMPTY_DOC, &merged);
    c.with_mode("empty-doc-nothing", MODE_EMPTY_DOC, &[0, 0]);
    for (name, sv) in [
        ("empty", &[0u8][..]),
        ("seed", &seed_sv),
        ("partial", &partial_sv),
        ("b", &b_sv),
    ] {
        c.with_mode(&format!("sv-{name}"), MODE_STATE_VECTOR, sv);
    }
    for (name, aw) in [
        ("seed", &aw_seed),
        ("more", &aw_more),
        ("removal", &aw_removal),
    ] {
        c.with_mode(&format!("awareness-{name}"), MODE_AWARENESS, aw);
    }
    let frames: Vec<(&str, Vec<u8>)> = vec![
        ("step1-seed", yjs::sync_step1(&seed_sv).to_vec()),
        ("step1-empty", yjs::sync_step1(&[0]).to_vec()),
        ("step2-move", yjs::sync_step2(&updates[0].1).to_vec()),
        ("update-nested", yjs::sync_update(&updates[3].1).to_vec()),
        ("update-merged", yjs::sync_update(&merged).to_vec()),
        ("awareness", yjs::awareness(&aw_more).to_vec()),
        ("query-awareness", vec![3]),
        ("auth", vec![2, 0, 2, b'o', b'k']),
    ];
    for (name, frame) in &frames {
        c.with_mode(&format!("frame-{name}"), MODE_FRAME, frame);
    }
    for pair in updates.windows(2) {
        let (first, second) = (&pair[0].1, &pair[1].1);
        if first.len() < 256 {
            let payload = [&[first.len() as u8][..], first, second].concat();
            c.with_mode(
                &format!("two-{}-{}", pair[0].0, pair[1].0),
                MODE_TWO_UPDATES,
                &payload,
            );
        }
    }
    // The hostile inputs of `src/doc/guard.rs`'s tests.
    for h in [
        "ffffff0f",
        "01ffffff0f0100",
        "000101ffffff0f",
        "0101010008010174ffff0f00",
        "0101010004010174ff0f00",
        "01010100020101748080808008",
        "010101ffffffff0f000100",
        "00010101ffffffff0f01",
        "8080808080808080808000",
        "01018080808080808010000000",
        "0101010008010174017dc0808080808080808002",
        "01010100020101740101310000",
        "010101000701017403017000",
        "01010100000000",
    ] {
        c.with_mode(&format!("hostile-{h}"), MODE_UPDATE, &hex(h));
    }
    c.with_mode("hostile-sv", MODE_STATE_VECTOR, &hex("ffffff0f01020304"));
    c.with_mode("hostile-awareness", MODE_AWARENESS, &hex("ffffffff0f"));
    let untrusted_files = c.files;

    // protocol_frames
    let mut c = Corpus::new(&root, "protocol_frames");
    for (name, text) in text_frames() {
        c.add(
            &format!("text-{name}"),
            &[&[0u8][..], text.as_bytes()].concat(),
        );
    }
    for (name, frame) in &frames {
        c.add(&format!("binary-{name}"), &[&[1u8][..], frame].concat());
    }
    for h in ["0000ffffff0f", "00020a01", "0105ffffffff0f", "09", ""] {
        c.add(&format!("binary-bad-{h}"), &[&[1u8][..], &hex(h)].concat());
    }
    let frames_files = c.files;

    // merge_convergence, legacy_convergence, session: `arbitrary` scripts from pseudo-random
    // bytes.
    let mut c = Corpus::new(&root, "merge_convergence");
    random_inputs(&mut c, 0x9E37_79B9_7F4A_7C15);
    let merge_files = c.files;
    let mut c = Corpus::new(&root, "legacy_convergence");
    random_inputs(&mut c, 0xD1B5_4A32_D192_ED03);
    let legacy_files = c.files;
    let mut c = Corpus::new(&root, "session");
    random_inputs(&mut c, 0x94D0_49BB_1331_11EB);
    let session_files = c.files;

    for input in fs::read_dir(root.join("untrusted_update")).unwrap() {
        untrusted::check(&fs::read(input.unwrap().path()).unwrap());
    }
    println!(
        "wrote untrusted_update {untrusted_files}, protocol_frames {frames_files}, merge_convergence {merge_files}, legacy_convergence {legacy_files}, session {session_files} files"
    );
}
