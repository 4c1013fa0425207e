//! Helpers: fixture items, reading a document's items as JSON, and a panic hook that keeps
//! panics the project catches quiet while still reporting the ones that escape.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Once, OnceLock};

use std::sync::Arc;

use collab_core::doc::schema;
use collab_core::doc::value::out_to_json;
use collab_core::doc::ydoc::Change;
use collab_core::doc::{
    CheckedAwareness, CheckedStateVector, CheckedUpdate, DocError, Effects, GuardedDoc, Scene,
};
use collab_core::session::awareness::{AwarenessError, AwarenessStates};
use serde_json::{Map, Value};
use yrs::{Map as _, MapRef, Out, ReadTxn};

/// The fixture scenes (copies of `../shared/fixtures`, so the fuzz crate builds alone).
const FIXTURES: [&str; 5] = [
    include_str!("../../fixtures/four_f_telescope.scene.json"),
    include_str!("../../fixtures/hwp_pbs_splitter.scene.json"),
    include_str!("../../fixtures/mach_zehnder_skeleton.scene.json"),
    include_str!("../../fixtures/single_lens_focus.scene.json"),
    include_str!("../../fixtures/two_mirror_steering.scene.json"),
];

/// Every item of every fixture scene, as the desktop client serialises it.
pub fn fixture_items() -> &'static [Map<String, Value>] {
    static ITEMS: OnceLock<Vec<Map<String, Value>>> = OnceLock::new();
    ITEMS.get_or_init(|| {
        FIXTURES
            .iter()
            .flat_map(|text| {
                let scene: Value = serde_json::from_str(text).expect("fixture is JSON");
                scene["items"].as_array().cloned().unwrap_or_default()
            })
            .filter_map(|item| item.as_object().cloned())
            .collect()
    })
}

/// The fixture scenes' `items` arrays, one per scene (parsed once: the session target starts
/// its hosts from them on every input).
pub fn fixture_scenes() -> &'static [Vec<Value>] {
    static SCENES: OnceLock<Vec<Vec<Value>>> = OnceLock::new();
    SCENES.get_or_init(|| {
        FIXTURES
            .iter()
            .map(|text| {
                let scene: Value = serde_json::from_str(text).expect("fixture is JSON");
                scene["items"].as_array().cloned().unwrap_or_default()
            })
            .collect()
    })
}

/// Every item of a document that is a map, read like `Scene` reads them.
pub fn items_json<T: ReadTxn>(txn: &T, items: &MapRef) -> BTreeMap<String, Value> {
    items
        .iter(txn)
        .filter_map(|(uuid, value)| match value {
            Out::YMap(item) => {
                let fields: Map<String, Value> = item
                    .iter(txn)
                    .map(|(k, v)| (k.to_owned(), out_to_json(txn, &v)))
                    .collect();
                Some((uuid.to_owned(), Value::Object(fields)))
            }
            _ => None,
        })
        .collect()
}

/// Untrusted update bytes as the server takes them: checked by the guard, then applied.
pub fn apply_untrusted(doc: &mut GuardedDoc, bytes: &[u8]) -> Result<Option<Change>, DocError> {
    doc.apply_update(&CheckedUpdate::check(bytes.to_vec())?)
}

/// [`apply_untrusted`] through a scene.
pub fn scene_apply_untrusted(
    scene: &mut Scene,
    user: &Arc<str>,
    bytes: &[u8],
) -> Result<Effects, DocError> {
    scene.apply_update(user, &CheckedUpdate::check(bytes.to_vec())?)
}

/// What a peer with the untrusted state vector `sv` lacks.
pub fn diff_untrusted(doc: &mut GuardedDoc, sv: &[u8]) -> Result<Vec<u8>, DocError> {
    doc.encode_diff_v1(&CheckedStateVector::check(sv.to_vec())?)
}

/// An untrusted awareness update, checked by the guard, then applied.
pub fn awareness_untrusted(
    states: &mut AwarenessStates,
    owner: u64,
    bytes: &[u8],
    now: std::time::Instant,
) -> Result<Option<Vec<u8>>, AwarenessError> {
    let checked =
        CheckedAwareness::check(bytes.to_vec()).map_err(|e| AwarenessError(e.to_string()))?;
    Ok(states.apply(owner, &checked, now)?.changed)
}

/// Stored updates loaded as the server loads them.
pub fn load_untrusted(updates: &[&[u8]]) -> Result<GuardedDoc, DocError> {
    let checked = updates
        .iter()
        .filter(|u| !u.is_empty())
        .map(|u| CheckedUpdate::check(u.to_vec()))
        .collect::<Result<Vec<_>, _>>()?;
    GuardedDoc::from_updates(&checked)
}

/// The scene's mirror (`Scene::full_state`), keyed by uuid.
pub fn mirror_json(scene: &mut Scene) -> BTreeMap<String, Value> {
    scene
        .full_state()
        .items
        .into_iter()
        .map(|(uuid, fields)| (uuid.to_string(), Value::Object((*fields).clone())))
        .collect()
}

/// Items as desktop clients are sent them: without a listed field of the wrong type (README
/// "Choices"). The mirror must equal the document read this way.
pub fn desktop_view(items: &BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    items
        .iter()
        .map(|(uuid, item)| {
            let fields = match item {
                Value::Object(fields) => Value::Object(
                    fields
                        .iter()
                        .filter(|(k, v)| schema::well_typed(k, v))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                ),
                other => other.clone(),
            };
            (uuid.clone(), fields)
        })
        .collect()
}

/// The session document's items, read from the document itself (not the mirror).
pub fn doc_json(scene: &mut Scene) -> BTreeMap<String, Value> {
    scene
        .doc_mut()
        .read(|txn, items| items_json(txn, items))
        .expect("the session document reads")
}

thread_local! {
    static QUIET: Cell<u32> = const { Cell::new(0) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    static CAUGHT: Cell<u64> = const { Cell::new(0) };
}

/// Installs (once) a panic hook that, inside [`quiet`], only records the panic (the project is
/// expected to catch it) and otherwise defers to the hook installed before (libFuzzer's hook
/// aborts, the default one prints). Set `FUZZ_BACKTRACE=1` to record backtraces as well.
pub fn install_quiet_panic_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        let backtraces = std::env::var_os("FUZZ_BACKTRACE").is_some();
        std::panic::set_hook(Box::new(move |info| {
            if QUIET.with(Cell::get) == 0 {
                return previous(info);
            }
            CAUGHT.with(|c| c.set(c.get() + 1));
            let mut text = info.to_string();
            if backtraces {
                let trace = std::backtrace::Backtrace::force_capture();
                text = format!("{text}\n{trace}");
            }
            LAST_PANIC.with(|p| *p.borrow_mut() = Some(text));
        }));
    });
}

/// Runs `f`, which may make yrs panic *inside* the project's guards. Returns `Err` with the
/// panic message when a panic escaped `f` (the project failed to contain it).
pub fn quiet<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    install_quiet_panic_hook();
    QUIET.with(|q| q.set(q.get() + 1));
    let result = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(q.get() - 1));
    result.map_err(|_| {
        LAST_PANIC
            .with(|p| p.borrow_mut().take())
            .unwrap_or_else(|| "unknown panic".to_owned())
    })
}

/// Like [`quiet`], but an escaped panic fails the scenario (outside the quiet zone, so the
/// fuzzer's hook sees it).
pub fn contained<R>(what: &str, f: impl FnOnce() -> R) -> R {
    match quiet(f) {
        Ok(r) => r,
        Err(message) => panic!("a panic escaped the project's guards in {what}: {message}"),
    }
}

/// How many panics the project caught so far on this thread (for statistics).
pub fn caught_panics() -> u64 {
    CAUGHT.with(Cell::get)
}

/// Where a client's scene (by uuid) differs from the server's, for a failure message: the uuids
/// only one side holds, and the first items that differ.
pub fn scene_difference(
    client: &BTreeMap<String, Value>,
    server: &BTreeMap<String, Value>,
) -> String {
    let only_client: Vec<_> = client.keys().filter(|k| !server.contains_key(*k)).collect();
    let only_server: Vec<_> = server.keys().filter(|k| !client.contains_key(*k)).collect();
    let differing: Vec<_> = client
        .iter()
        .filter_map(|(k, v)| {
            let s = server.get(k).filter(|s| *s != v)?;
            Some(format!("{k}: client {v} server {s}"))
        })
        .take(3)
        .collect();
    format!("only on the client {only_client:?}, only on the server {only_server:?}, differing {differing:#?}")
}

/// Lowercase hex, for messages and regression files.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Most steps one fuzz input turns into.
pub const MAX_STEPS: usize = 512;

/// Steps from the rest of a fuzz input: one after the other until the input ends (the
/// `Vec` impl of `arbitrary` would stop at the first even "continue?" byte, which keeps
/// scripts from random bytes one or two steps long).
#[cfg(not(test))]
pub fn steps<'a, T: arbitrary::Arbitrary<'a>>(
    u: &mut arbitrary::Unstructured<'a>,
) -> arbitrary::Result<Vec<T>> {
    steps_up_to(u, MAX_STEPS)
}

/// [`steps`], at most `max` of them.
#[cfg(not(test))]
pub fn steps_up_to<'a, T: arbitrary::Arbitrary<'a>>(
    u: &mut arbitrary::Unstructured<'a>,
    max: usize,
) -> arbitrary::Result<Vec<T>> {
    let mut steps = Vec::new();
    while !u.is_empty() && steps.len() < max {
        steps.push(u.arbitrary()?);
    }
    Ok(steps)
}
