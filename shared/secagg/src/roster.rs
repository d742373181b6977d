//! The checked roster both sides work from: members sorted by name (a member's Shamir `x` is
//! its 1-based position), unique names and keys, and a threshold that is a strict majority.

use crate::{Error, PublicKeys, Result};

#[derive(Debug)]
pub(crate) struct Roster {
    members: Vec<(String, PublicKeys)>,
    threshold: u32,
}

impl Roster {
    /// Check `members` against the rules; `min` is the smallest threshold the caller accepts
    /// (never below 2: one share would be the secret itself).
    pub(crate) fn new(members: &[(String, PublicKeys)], threshold: u32, min: u32) -> Result<Roster> {
        let mut members = members.to_vec();
        members.sort_by(|a, b| a.0.cmp(&b.0));
        for pair in members.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(Error::Duplicate {
                    node: pair[0].0.clone(),
                    what: "roster",
                });
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (name, keys) in &members {
            // A key seen twice, even a node's cipher key equal to its own mask key, means a
            // copied key: its owner's secrets would be someone else's too.
            if !seen.insert(keys.cipher) || !seen.insert(keys.mask) {
                return Err(Error::DuplicateKey { node: name.clone() });
            }
        }
        let n = members.len();
        let bad = |rule| Error::BadThreshold {
            threshold,
            members: n,
            rule,
        };
        if u32::try_from(n).is_err() {
            return Err(bad("too many members"));
        }
        if threshold < 2 {
            return Err(bad("it must be at least 2"));
        }
        if threshold < min {
            return Err(bad("it is below the step's threshold"));
        }
        if threshold as usize > n {
            return Err(bad("it exceeds the number of members"));
        }
        if 2 * threshold as usize <= n {
            return Err(Error::NotMajority {
                threshold,
                members: n,
            });
        }
        Ok(Roster { members, threshold })
    }

    pub(crate) fn threshold(&self) -> u32 {
        self.threshold
    }

    pub(crate) fn len(&self) -> usize {
        self.members.len()
    }

    /// Members in name order, with their Shamir x (1-based position).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (u32, &str, &PublicKeys)> {
        self.members
            .iter()
            .zip(1u32..)
            .map(|((name, keys), x)| (x, name.as_str(), keys))
    }

    /// A member's x and keys.
    pub(crate) fn get(&self, name: &str) -> Option<(u32, &PublicKeys)> {
        let i = self
            .members
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        // Positions fit u32: checked in `new`.
        Some((i as u32 + 1, &self.members[i].1))
    }

    /// A member's x and keys, or [`Error::NotMember`].
    pub(crate) fn member(&self, name: &str) -> Result<(u32, &PublicKeys)> {
        self.get(name).ok_or_else(|| Error::NotMember {
            node: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<(String, PublicKeys)> {
        (0..n)
            .map(|i| {
                let keys = PublicKeys {
                    cipher: [2 * i as u8 + 1; 32],
                    mask: [2 * i as u8 + 2; 32],
                };
                (format!("n{i}"), keys)
            })
            .collect()
    }

    #[test]
    fn rules_are_checked() {
        fn check(members: &[(String, PublicKeys)], t: u32, min: u32, expected: Option<&str>) {
            match (Roster::new(members, t, min), expected) {
                (Ok(_), None) => {}
                (Err(e), Some(rule)) => assert!(e.to_string().contains(rule), "{e} lacks {rule}"),
                (got, expected) => panic!("t={t}: got {got:?}, expected {expected:?}"),
            }
        }
        check(&members(3), 2, 0, None);
        check(&members(10), 6, 0, None);
        check(&members(10), 10, 0, None);
        check(&members(10), 5, 0, Some("strict majority"));
        check(&members(4), 2, 0, Some("strict majority"));
        check(&members(3), 1, 0, Some("at least 2"));
        check(&members(3), 4, 0, Some("exceeds"));
        check(&members(5), 3, 4, Some("below the step's"));
        check(&members(1), 2, 0, Some("exceeds"));

        let mut twice = members(3);
        twice[2].0 = "n0".into();
        check(&twice, 2, 0, Some("`n0` appears twice"));
        let mut copied = members(3);
        copied[2].1.mask = copied[0].1.cipher;
        check(&copied, 2, 0, Some("`n2` advertised a public key"));
        let mut same = members(3);
        same[1].1.mask = same[1].1.cipher;
        check(&same, 2, 0, Some("`n1` advertised"));
    }

    #[test]
    fn positions_follow_name_order() {
        let mut m = members(3);
        m.reverse();
        let roster = Roster::new(&m, 2, 0).expect("roster");
        let names: Vec<_> = roster.iter().map(|(x, name, _)| (x, name.to_owned())).collect();
        assert_eq!(names, [(1, "n0".into()), (2, "n1".into()), (3, "n2".into())]);
        assert_eq!(roster.get("n2").map(|(x, _)| x), Some(3));
        assert!(roster.member("zz").is_err());
    }
}
