//! What a party may do in the federation, carried in the subject OU of its certificate.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A statistical office that holds data and trains locally.
    Node,
    /// Submits experiments and reads pooled results.
    Researcher,
    /// Operates the federation.
    Admin,
    /// Runs rounds and aggregates; the only role that serves connections.
    Coordinator,
}

impl Role {
    /// Every role, in declaration order.
    pub const ALL: [Role; 4] = [Role::Node, Role::Researcher, Role::Admin, Role::Coordinator];

    /// The spelling used in certificates, configs and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Researcher => "researcher",
            Role::Admin => "admin",
            Role::Coordinator => "coordinator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = Error;

    // Exact lower-case match only: a role is an authorisation decision, so no guessing.
    fn from_str(s: &str) -> Result<Self, Error> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| Error::Unknown {
                what: "role",
                // Escaped and bounded: the text may come from a certificate or a command line.
                value: s.chars().take(64).flat_map(char::escape_default).collect(),
                expected: "node, researcher, admin, coordinator",
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_parse_exactly() {
        for r in Role::ALL {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("Node".parse::<Role>().is_err());
        let err = "ad\u{202e}min"
            .parse::<Role>()
            .expect_err("not a role")
            .to_string();
        assert!(err.contains("\\u{202e}"), "{err}");
    }
}
