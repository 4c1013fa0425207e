//! What a connection may do in a session: its token's role, and whether it holds its user
//! name. The shell checks tokens (signatures, expiry, the session they name); the session only
//! applies what they grant, so every rule is tested by feeding it inputs.

use serde::{Deserialize, Serialize};

/// A token's role (README, "Securing a server").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the scene and shows presence; changes nothing.
    View,
    /// Reads and changes the scene.
    Edit,
    /// Every session, and the HTTP API.
    Admin,
}

impl Role {
    pub fn may_edit(self) -> bool {
        self >= Role::Edit
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::View => "view",
            Role::Edit => "edit",
            Role::Admin => "admin",
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "view" => Ok(Role::View),
            "edit" => Ok(Role::Edit),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("{s:?} is not a role (view, edit, admin)")),
        }
    }
}

/// What a joining connection was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub role: Role,
    /// Its token binds its user name (or is an admin's): while it is a member, only another
    /// connection holding the name may join under it (and so replace it).
    pub holds_name: bool,
}

impl Access {
    /// A server without a key: everyone edits, nobody holds a name (a newer connection of the
    /// same name replaces the older one, PROTOCOL §3.5).
    pub const OPEN: Access = Access {
        role: Role::Edit,
        holds_name: false,
    };
}
