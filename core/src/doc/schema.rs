//! The types the desktop client relies on for the fields it reads as numbers or booleans.
//!
//! The client feeds these straight into Qt (`setPos`, `setRotation`, `setZValue`, spin boxes):
//! a string or `null` where it expects a number raises in its message handler, and the item
//! is lost on that client. Fields not listed here are stored as sent.

use serde_json::Value;

use super::value::ItemFields;

/// What a listed field must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// A JSON number (JSON cannot carry NaN or infinities, so every parsed number is finite).
    Number,
    Bool,
}

impl FieldKind {
    fn name(self) -> &'static str {
        match self {
            FieldKind::Number => "a finite number",
            FieldKind::Bool => "a boolean",
        }
    }

    fn admits(self, value: &Value) -> bool {
        match self {
            FieldKind::Number => value.as_f64().is_some_and(f64::is_finite),
            FieldKind::Bool => value.is_boolean(),
        }
    }
}

/// Whether the desktop client can read `value` for `field` (any value of a field not listed).
/// A Yjs client may write anything; desktop clients are not sent a listed field holding
/// something else (README "Choices").
pub fn well_typed(field: &str, value: &Value) -> bool {
    field_kind(field).is_none_or(|kind| kind.admits(value))
}

/// The kind `field` must hold, if it is one the client reads as a number or a boolean: the
/// positions, rotation and stacking order, and the numeric and boolean parameters of
/// components and sources, as both client variants serialise them.
pub fn field_kind(field: &str) -> Option<FieldKind> {
    match field {
        "x_mm"
        | "y_mm"
        | "angle_deg"
        | "z_value"
        | "object_height_mm"
        | "size_mm"
        | "n_rays"
        | "ray_length_mm"
        | "spread_deg"
        | "wavelength_nm"
        | "polarization_angle_deg"
        | "beam_waist_mm"
        | "custom_jones_ex_real"
        | "custom_jones_ex_imag"
        | "custom_jones_ey_real"
        | "custom_jones_ey_imag" => Some(FieldKind::Number),
        "use_custom_jones" | "locked" => Some(FieldKind::Bool),
        _ => None,
    }
}

/// The first field of `fields` whose value has the wrong type, with what it must hold.
pub fn ill_typed_field(fields: &ItemFields) -> Option<(&str, &'static str)> {
    fields.iter().find_map(|(name, value)| {
        field_kind(name)
            .filter(|kind| !kind.admits(value))
            .map(|kind| (name.as_str(), kind.name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Value) -> ItemFields {
        serde_json::from_value(value).expect("an object")
    }

    #[test]
    fn positions_must_be_numbers_and_flags_booleans() {
        assert_eq!(
            ill_typed_field(&fields(json!({"x_mm": 1.5, "y_mm": -2, "angle_deg": 0.0}))),
            None
        );
        for bad in [
            json!("abc"),
            json!(null),
            json!([1, 2]),
            json!({"a": 1}),
            json!(true),
        ] {
            assert_eq!(
                ill_typed_field(&fields(json!({"name": "L1", "y_mm": bad}))),
                Some(("y_mm", "a finite number"))
            );
        }
        assert_eq!(
            ill_typed_field(&fields(json!({"locked": 0}))),
            Some(("locked", "a boolean"))
        );
        assert_eq!(
            ill_typed_field(&fields(
                json!({"notes": null, "interfaces": "x", "locked": false})
            )),
            None,
            "fields outside the list are free"
        );
    }

    #[test]
    fn fixtures_are_well_typed() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/fixtures");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).expect("../shared/fixtures") {
            let path = entry.expect("a fixture").path();
            let scene: Value =
                serde_json::from_slice(&std::fs::read(&path).expect("readable")).expect("JSON");
            let mut stack = vec![&scene];
            while let Some(value) = stack.pop() {
                match value {
                    Value::Object(map) => {
                        if map.contains_key("item_uuid") {
                            seen += 1;
                            assert_eq!(ill_typed_field(map), None, "{}", path.display());
                        }
                        stack.extend(map.values());
                    }
                    Value::Array(items) => stack.extend(items),
                    _ => {}
                }
            }
        }
        assert!(seen > 10, "the fixtures hold items ({seen})");
    }
}
