//! Roles and what each may do: the permission matrix every endpoint is checked against, in one
//! place. A role is held in a tenant (for all its projects) or in one project; an API key carries
//! one. The operator's admin token is above all of them and is not a role.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A role, from least to most allowed (`Ord` follows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Viewer,
    Developer,
    Admin,
    Owner,
}

/// Something a caller may or may not do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// Call the `/v1/*` inference endpoints.
    Inference,
    /// Read usage, spend, quota status and analytics.
    ReadUsage,
    /// Read traces, without their bodies.
    ReadTraces,
    /// Read bodies: prompts, completions, tool arguments and results.
    ReadBodies,
    /// Create and revoke one's own keys.
    ManageOwnKeys,
    /// Manage others' keys and the members, set quotas and policies, read policy findings.
    ManageTenant,
    /// Grant the owner role and erase the tenant.
    OwnTenant,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Developer, Role::Admin, Role::Owner];

    /// The role a name written in a key or grant stands for. `inference`, the role keys were
    /// issued with before roles existed, reads as `developer`.
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "viewer" => Some(Role::Viewer),
            "developer" | "inference" => Some(Role::Developer),
            "admin" => Some(Role::Admin),
            "owner" => Some(Role::Owner),
            _ => None,
        }
    }

    /// The highest role among `names` (unknown names count for nothing).
    pub fn highest<S: AsRef<str>>(names: &[S]) -> Option<Role> {
        names.iter().filter_map(|n| Role::parse(n.as_ref())).max()
    }

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Developer => "developer",
            Role::Admin => "admin",
            Role::Owner => "owner",
        }
    }

    /// The matrix.
    pub fn allows(self, permission: Permission) -> bool {
        let least = match permission {
            Permission::ReadUsage | Permission::ReadTraces => Role::Viewer,
            Permission::Inference | Permission::ReadBodies | Permission::ManageOwnKeys => {
                Role::Developer
            }
            Permission::ManageTenant => Role::Admin,
            Permission::OwnTenant => Role::Owner,
        };
        self >= least
    }

    /// Whether a holder of this role may grant (or issue a key with) `role`: nobody grants above
    /// their own role.
    pub fn may_grant(self, role: Role) -> bool {
        role <= self
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Permission {
    /// How a refusal names what was missing.
    pub fn describe(self) -> &'static str {
        match self {
            Permission::Inference => "calling models needs the developer role or above",
            Permission::ReadUsage => "reading usage needs the viewer role or above",
            Permission::ReadTraces => "reading traces needs the viewer role or above",
            Permission::ReadBodies => "reading bodies needs the developer role or above",
            Permission::ManageOwnKeys => "managing keys needs the developer role or above",
            Permission::ManageTenant => {
                "managing others' keys, members, quotas and policies needs the admin role or above"
            }
            Permission::OwnTenant => {
                "granting the owner role and erasing the tenant need the owner role"
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_matrix_is_the_documented_one() {
        use Permission::*;
        // (permission, viewer, developer, admin, owner) as in docs/roles.md.
        let matrix = [
            (Inference, [false, true, true, true]),
            (ReadUsage, [true, true, true, true]),
            (ReadTraces, [true, true, true, true]),
            (ReadBodies, [false, true, true, true]),
            (ManageOwnKeys, [false, true, true, true]),
            (ManageTenant, [false, false, true, true]),
            (OwnTenant, [false, false, false, true]),
        ];
        for (permission, allowed) in matrix {
            for (role, allowed) in Role::ALL.into_iter().zip(allowed) {
                assert_eq!(role.allows(permission), allowed, "{role} {permission:?}");
            }
        }
    }

    #[test]
    fn names_parse_back_and_nobody_grants_above_their_role() {
        for role in Role::ALL {
            assert_eq!(Role::parse(role.name()), Some(role));
            assert!(role.may_grant(role));
        }
        assert_eq!(Role::parse("inference"), Some(Role::Developer));
        assert_eq!(Role::parse("root"), None);
        assert_eq!(
            Role::highest(&["viewer", "root", "admin"]),
            Some(Role::Admin)
        );
        assert!(!Role::Admin.may_grant(Role::Owner));
        assert!(!Role::Developer.may_grant(Role::Admin));
    }
}
