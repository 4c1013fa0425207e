//! The Optiverse JSON protocol (PROTOCOL §3): parsing what clients send, encoding what the
//! server sends.
//!
//! Parsing validates everything a client controls (types, id lengths, nesting depth, counts)
//! so the session only ever sees well-formed commands; every failure names its error code.

use std::sync::Arc;
use std::time::SystemTime;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::doc::legacy::{Action, Command, UploadedItem};
use crate::doc::scene::{item_type_of, CommandMessage, FullState};
use crate::doc::schema::ill_typed_field;
use crate::doc::value::{json_depth, ItemFields, MAX_VALUE_DEPTH};

/// Protocol name and version sent in `connection:ack`.
pub const PROTOCOL_NAME: &str = "optiverse-collab/1";

/// Longest item id, item type or field name accepted.
const MAX_NAME_CHARS: usize = 256;
/// Most fields one item may carry.
const MAX_FIELDS: usize = 1024;

/// The `code` of an `error` message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadJson,
    BadMessage,
    UnknownType,
    /// Over the connection's message rate: the message was not applied.
    RateLimited,
    /// Not bad input: the session could not be loaded (the connection is then closed 1011).
    Unavailable,
    /// The connection's token does not allow it (a `view` token's command or upload): not
    /// applied.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
        }
    }
}

/// A rejected frame: sent back as `{"type":"error",...}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    fn bad(message: impl Into<String>) -> Self {
        ProtocolError::new(ErrorCode::BadMessage, message)
    }
}

impl std::fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// A valid frame from an Optiverse client.
#[derive(Debug, Clone, PartialEq)]
pub enum ClientMessage {
    Ping,
    Command(Command),
    SyncRequest,
    /// A `sync:full_state` upload (only the host's is applied).
    FullState(Vec<UploadedItem>),
}

/// Parses one text frame.
pub fn parse_client_message(text: &str) -> Result<ClientMessage, ProtocolError> {
    let value: Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadJson, format!("not valid JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(ProtocolError::bad("a message must be a JSON object"));
    };
    let kind = match object.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(ProtocolError::bad("\"type\" must be a string")),
        None => return Err(ProtocolError::bad("missing \"type\"")),
    };
    match kind {
        "ping" => Ok(ClientMessage::Ping),
        "sync:request" => Ok(ClientMessage::SyncRequest),
        "command" => parse_command(object.remove("command")).map(ClientMessage::Command),
        "sync:full_state" => parse_upload(object.remove("state")).map(ClientMessage::FullState),
        other => Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown message type {:?}", truncate(other)),
        )),
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

/// A name as ids, types and field names must be: 1 to 256 characters, no control characters.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().count() <= MAX_NAME_CHARS && !s.chars().any(char::is_control)
}

fn parse_command(command: Option<Value>) -> Result<Command, ProtocolError> {
    let Some(Value::Object(mut command)) = command else {
        return Err(ProtocolError::bad("\"command\" must be an object"));
    };
    let action = command
        .get("action")
        .and_then(Value::as_str)
        .ok_or_else(|| ProtocolError::bad("command lacks a string \"action\""))?;
    let action = Action::parse(action)
        .ok_or_else(|| ProtocolError::bad(format!("unknown action {:?}", truncate(action))))?;
    let item_id = match command.get("item_id") {
        Some(Value::String(id)) if valid_name(id) => Arc::<str>::from(id.as_str()),
        _ => return Err(ProtocolError::bad("command lacks a valid \"item_id\"")),
    };
    let item_type = match command.get("item_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if valid_name(t) => Some(t.clone()),
        Some(_) => return Err(ProtocolError::bad("\"item_type\" must be a short string")),
    };
    let data = match command.remove("data") {
        None | Some(Value::Null) if action == Action::Remove => Map::new(),
        Some(Value::Object(data)) => check_fields(data)?,
        _ => return Err(ProtocolError::bad("\"data\" must be an object")),
    };
    Ok(Command {
        action,
        item_type,
        item_id,
        data,
    })
}

fn check_fields(fields: ItemFields) -> Result<ItemFields, ProtocolError> {
    if fields.len() > MAX_FIELDS {
        return Err(ProtocolError::bad(format!(
            "an item may have at most {MAX_FIELDS} fields"
        )));
    }
    if let Some(key) = fields.keys().find(|k| !valid_name(k)) {
        return Err(ProtocolError::bad(format!(
            "invalid field name {:?}",
            truncate(key)
        )));
    }
    if fields.values().any(|v| json_depth(v) > MAX_VALUE_DEPTH) {
        return Err(ProtocolError::bad(format!(
            "field values may nest at most {MAX_VALUE_DEPTH} levels"
        )));
    }
    if let Some((field, kind)) = ill_typed_field(&fields) {
        return Err(ProtocolError::bad(format!("\"{field}\" must be {kind}")));
    }
    Ok(fields)
}

fn parse_upload(state: Option<Value>) -> Result<Vec<UploadedItem>, ProtocolError> {
    let Some(Value::Object(mut state)) = state else {
        return Err(ProtocolError::bad("\"state\" must be an object"));
    };
    let Some(Value::Array(items)) = state.remove("items") else {
        return Err(ProtocolError::bad("\"state.items\" must be an array"));
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Object(mut fields) = item else {
                return Err(ProtocolError::bad("each item must be an object"));
            };
            let uuid = ["item_uuid", "uuid"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(Value::as_str))
                .filter(|id| valid_name(id))
                .map(Arc::<str>::from)
                .ok_or_else(|| ProtocolError::bad("each item needs a valid \"item_uuid\""))?;
            // The desktop client adds `uuid` beside `item_uuid` in its uploads; it names the
            // item's key, not a field (a command's dict lacks it, and a full state adds it).
            fields.remove("uuid");
            let item_type = ["item_type", "_type"]
                .iter()
                .find_map(|k| fields.get(*k).and_then(Value::as_str))
                .map(str::to_owned);
            Ok(UploadedItem {
                uuid,
                item_type,
                fields: check_fields(fields)?,
            })
        })
        .collect()
}

/// `at` as RFC 3339 UTC with milliseconds, e.g. `2026-11-25T19:22:01.123Z`.
pub fn timestamp(at: SystemTime) -> String {
    const FORMAT: &[time::format_description::FormatItem<'static>] = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    time::OffsetDateTime::from(at)
        .format(FORMAT)
        .unwrap_or_else(|_| String::from("1970-01-01T00:00:00.000Z"))
}

/// One member of the session's user list.
#[derive(Debug, Clone, Serialize)]
pub struct UserEntry {
    pub user_id: Arc<str>,
    pub connected_at: Arc<str>,
}

/// The Yjs part of the ack of a `?yjs=1` connection (PROTOCOL §4).
#[derive(Debug, Clone)]
pub struct YjsAckFields {
    pub snapshot: String,
    pub state_vector: String,
}

#[derive(Serialize)]
struct Ack<'a> {
    r#type: &'static str,
    session_id: &'a str,
    user_id: &'a str,
    is_host: bool,
    users: &'a [UserEntry],
    timestamp: &'a str,
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    state_vector: Option<&'a str>,
}

/// `connection:ack` (PROTOCOL §3.1, §4).
pub fn encode_ack(
    timestamp: &str,
    session_id: &str,
    user_id: &str,
    is_host: bool,
    users: &[UserEntry],
    yjs: Option<&YjsAckFields>,
) -> String {
    to_json(&Ack {
        r#type: "connection:ack",
        session_id,
        user_id,
        is_host,
        users,
        timestamp,
        protocol: PROTOCOL_NAME,
        snapshot: yjs.map(|y| y.snapshot.as_str()),
        state_vector: yjs.map(|y| y.state_vector.as_str()),
    })
}

/// One item of a full state: its fields plus `uuid`, `item_uuid` and `item_type`.
struct SceneItem<'a>(&'a str, &'a ItemFields);

impl Serialize for SceneItem<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let (uuid, fields) = (self.0, self.1);
        let extra = ["uuid", "item_uuid", "item_type"];
        let mut map = serializer.serialize_map(None)?;
        for (k, v) in fields.iter().filter(|(k, _)| !extra.contains(&k.as_str())) {
            map.serialize_entry(k, v)?;
        }
        map.serialize_entry("uuid", uuid)?;
        map.serialize_entry("item_uuid", uuid)?;
        map.serialize_entry("item_type", item_type_of(fields))?;
        map.end()
    }
}

struct SceneItems<'a>(&'a FullState);

impl Serialize for SceneItems<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.0
                .items
                .iter()
                .map(|(uuid, fields)| SceneItem(uuid, fields)),
        )
    }
}

#[derive(Serialize)]
struct SceneState<'a> {
    items: SceneItems<'a>,
    version: u64,
    timestamp: &'a str,
}

/// The `state` object of `sync:full_state`, also served by `GET /api/sessions/{s}/scene`.
pub fn encode_scene(timestamp: &str, state: &FullState) -> String {
    to_json(&scene_state(timestamp, state))
}

fn scene_state<'a>(timestamp: &'a str, state: &'a FullState) -> SceneState<'a> {
    SceneState {
        items: SceneItems(state),
        version: state.version,
        timestamp,
    }
}

#[derive(Serialize)]
struct FullStateMessage<'a> {
    r#type: &'static str,
    state: SceneState<'a>,
    from_server: bool,
}

/// `sync:full_state` (PROTOCOL §3.1).
pub fn encode_full_state(timestamp: &str, state: &FullState) -> String {
    to_json(&FullStateMessage {
        r#type: "sync:full_state",
        state: scene_state(timestamp, state),
        from_server: true,
    })
}

#[derive(Serialize)]
struct CommandBody<'a> {
    action: &'static str,
    item_type: &'a str,
    item_id: &'a str,
    data: &'a ItemFields,
}

#[derive(Serialize)]
struct CommandEnvelope<'a> {
    r#type: &'static str,
    command: CommandBody<'a>,
    user_id: &'a str,
    timestamp: &'a str,
}

/// A `command` to a legacy client (PROTOCOL §3.3).
pub fn encode_command(timestamp: &str, message: &CommandMessage) -> String {
    to_json(&CommandEnvelope {
        r#type: "command",
        command: CommandBody {
            action: message.action.as_str(),
            item_type: &message.item_type,
            item_id: &message.item_id,
            data: &message.data,
        },
        user_id: &message.user_id,
        timestamp,
    })
}

#[derive(Serialize)]
struct UserEvent<'a> {
    r#type: &'static str,
    user_id: &'a str,
    timestamp: &'a str,
}

/// `user:joined` or `user:left`.
pub fn encode_user_event(timestamp: &str, joined: bool, user_id: &str) -> String {
    to_json(&UserEvent {
        r#type: if joined { "user:joined" } else { "user:left" },
        user_id,
        timestamp,
    })
}

/// `pong`.
pub fn encode_pong(timestamp: &str) -> String {
    to_json(&serde_json::json!({"type": "pong", "timestamp": timestamp}))
}

/// `error`.
pub fn encode_error(error: &ProtocolError) -> String {
    to_json(
        &serde_json::json!({"type": "error", "code": error.code.as_str(), "message": error.message}),
    )
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Serialising these types cannot fail: every map key is a string.
    serde_json::to_string(value).unwrap_or_else(|_| String::from("{}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code_of(text: &str) -> ErrorCode {
        parse_client_message(text).unwrap_err().code
    }

    #[test]
    fn classifies_bad_frames() {
        assert_eq!(code_of("{nope"), ErrorCode::BadJson);
        assert_eq!(code_of("[1,2]"), ErrorCode::BadMessage);
        assert_eq!(code_of("{\"user_id\":\"a\"}"), ErrorCode::BadMessage);
        assert_eq!(code_of("{\"type\":7}"), ErrorCode::BadMessage);
        assert_eq!(code_of("{\"type\":\"dance\"}"), ErrorCode::UnknownType);
        assert_eq!(code_of("{\"type\":\"command\"}"), ErrorCode::BadMessage);
        assert_eq!(
            code_of(r#"{"type":"command","command":{"action":"fly","item_id":"a","data":{}}}"#),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code_of(
                r#"{"type":"command","command":{"action":"move_item","item_id":"","data":{}}}"#
            ),
            ErrorCode::BadMessage
        );
        assert_eq!(
            code_of(
                r#"{"type":"command","command":{"action":"move_item","item_id":"a","data":[]}}"#
            ),
            ErrorCode::BadMessage
        );
        for bad in [r#""abc""#, "null", "[1,2]"] {
            let move_to = format!(
                r#"{{"type":"command","command":{{"action":"move_item","item_id":"a","data":{{"x_mm":{bad},"y_mm":0.0,"angle_deg":0.0}}}}}}"#
            );
            assert_eq!(code_of(&move_to), ErrorCode::BadMessage, "{move_to}");
            let upload = format!(
                r#"{{"type":"sync:full_state","state":{{"items":[{{"item_uuid":"a","x_mm":0.0}},{{"item_uuid":"b","angle_deg":{bad}}}]}}}}"#
            );
            assert_eq!(code_of(&upload), ErrorCode::BadMessage, "{upload}");
        }
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        assert_eq!(
            code_of(&format!(
                r#"{{"type":"command","command":{{"action":"add_item","item_id":"a","data":{{"x":{deep}}}}}}}"#
            )),
            ErrorCode::BadMessage
        );
    }

    #[test]
    fn parses_commands_and_uploads() {
        let msg = parse_client_message(
            r#"{"type":"command","command":{"action":"add_item","item_type":"source","item_id":"u1","data":{"x_mm":1.0}},"user_id":"a"}"#,
        )
        .unwrap();
        let ClientMessage::Command(cmd) = msg else {
            panic!("not a command")
        };
        assert_eq!(cmd.action, Action::Add);
        assert_eq!(cmd.item_type.as_deref(), Some("source"));
        assert_eq!(cmd.data.get("x_mm"), Some(&json!(1.0)));
        let msg = parse_client_message(
            r#"{"type":"command","command":{"action":"remove_item","item_type":"source","item_id":"u1"}}"#,
        )
        .unwrap();
        assert!(matches!(
            msg,
            ClientMessage::Command(Command {
                action: Action::Remove,
                ..
            })
        ));
        let msg = parse_client_message(
            r#"{"type":"sync:full_state","state":{"items":[{"_type":"source","item_uuid":"u1","x_mm":0.0}]}}"#,
        )
        .unwrap();
        let ClientMessage::FullState(items) = msg else {
            panic!("not an upload")
        };
        assert_eq!(items[0].uuid.as_ref(), "u1");
        assert_eq!(items[0].item_type.as_deref(), Some("source"));
        assert_eq!(
            parse_client_message(r#"{"type":"ping"}"#).unwrap(),
            ClientMessage::Ping
        );
    }

    #[test]
    fn scene_items_carry_uuid_and_type_once() {
        let fields: ItemFields =
            serde_json::from_value(json!({"item_type": "ruler", "item_uuid": "old", "x_mm": 1}))
                .unwrap();
        let state = FullState {
            items: vec![("u1".into(), Arc::new(fields))],
            version: 3,
        };
        let v: Value = serde_json::from_str(&encode_full_state("t", &state)).unwrap();
        assert_eq!(v["type"], "sync:full_state");
        assert_eq!(v["from_server"], true);
        assert_eq!(v["state"]["version"], 3);
        let item = &v["state"]["items"][0];
        assert_eq!(item["uuid"], "u1");
        assert_eq!(item["item_uuid"], "u1");
        assert_eq!(item["item_type"], "ruler");
        assert_eq!(item["x_mm"], 1);
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_795_634_521_123);
        assert_eq!(timestamp(at), "2026-11-25T19:22:01.123Z");
    }
}
