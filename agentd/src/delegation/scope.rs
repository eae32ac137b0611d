//! Scopes: the tool/action permissions an identity holds (DESIGN section 3, "Scope").
//!
//! A scope is `resource:action`, or `resource:*` for every action on a resource. The subset
//! test is decidable by construction: `a` covers `b` exactly when they are equal, or `a` is
//! `r:*` and `b` is `r:<anything>`. There is no other wildcard (no `*:read`, no `crm*`), so
//! "is this set contained in that one" is a finite check over the elements of both sets.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Longest scope accepted, in bytes.
pub const MAX_SCOPE_LEN: usize = 256;
/// Most scopes one identity may hold.
pub const MAX_SCOPES: usize = 64;

/// The wildcard action.
const ANY: &str = "*";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error("{input:?} must be resource:action or resource:* (letters, digits, _ - . /; at most {MAX_SCOPE_LEN} bytes)")]
    Syntax { input: String },
    #[error("{count} scopes; at most {MAX_SCOPES}")]
    TooMany { count: usize },
}

/// One permission, `resource:action` or `resource:*`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    text: String,
    /// Byte index of the `:` separating resource and action.
    colon: usize,
}

fn part_ok(p: &str) -> bool {
    !p.is_empty()
        && p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'/'))
}

impl FromStr for Scope {
    type Err = ScopeError;

    fn from_str(s: &str) -> Result<Self, ScopeError> {
        let bad = || ScopeError::Syntax {
            input: s.chars().take(80).collect(),
        };
        if s.len() > MAX_SCOPE_LEN {
            return Err(bad());
        }
        let (resource, action) = s.split_once(':').ok_or_else(bad)?;
        if !part_ok(resource) || !(action == ANY || part_ok(action)) {
            return Err(bad());
        }
        Ok(Self {
            text: s.to_string(),
            colon: resource.len(),
        })
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl Scope {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn resource(&self) -> &str {
        &self.text[..self.colon]
    }

    pub fn action(&self) -> &str {
        &self.text[self.colon + 1..]
    }

    pub fn is_wildcard(&self) -> bool {
        self.action() == ANY
    }

    /// Whether holding `self` grants `other`: equal, or `self` is `r:*` and `other` is on `r`.
    pub fn covers(&self, other: &Scope) -> bool {
        self == other || (self.is_wildcard() && self.resource() == other.resource())
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

/// A set of scopes, sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct ScopeSet(BTreeSet<Scope>);

impl ScopeSet {
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses every string; the error names the first bad one.
    pub fn parse<S: AsRef<str>>(raw: &[S]) -> Result<Self, ScopeError> {
        let set = raw
            .iter()
            .map(|s| s.as_ref().parse::<Scope>())
            .collect::<Result<BTreeSet<_>, _>>()?;
        if set.len() > MAX_SCOPES {
            return Err(ScopeError::TooMany { count: set.len() });
        }
        Ok(Self(set))
    }

    /// The RFC 8693 section 4.2 form: scopes separated by single spaces.
    pub fn parse_space_separated(raw: &str) -> Result<Self, ScopeError> {
        let parts: Vec<&str> = raw.split(' ').filter(|s| !s.is_empty()).collect();
        Self::parse(&parts)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(ToString::to_string).collect()
    }

    /// RFC 8693 `scope`: space-separated.
    pub fn to_space_separated(&self) -> String {
        self.to_strings().join(" ")
    }

    /// Whether some scope in the set covers `scope`.
    pub fn allows(&self, scope: &Scope) -> bool {
        self.0.iter().any(|s| s.covers(scope))
    }

    /// The first scope of `self` that `other` does not allow, if any.
    pub fn first_not_allowed_by<'a>(&'a self, other: &ScopeSet) -> Option<&'a Scope> {
        self.0.iter().find(|s| !other.allows(s))
    }

    /// Every permission `self` grants is also granted by `other`.
    pub fn is_subset_of(&self, other: &ScopeSet) -> bool {
        self.first_not_allowed_by(other).is_none()
    }

    /// The largest set granting exactly what both grant. Complete because the only wildcard
    /// is `r:*`: an exact scope allowed by both is in one of the sets or both hold `r:*`.
    pub fn intersection(&self, other: &ScopeSet) -> ScopeSet {
        let mut out: BTreeSet<Scope> = self.0.iter().filter(|s| other.allows(s)).cloned().collect();
        out.extend(other.0.iter().filter(|s| self.allows(s)).cloned());
        // Drop exact scopes a kept wildcard already covers.
        let wild: Vec<Scope> = out.iter().filter(|s| s.is_wildcard()).cloned().collect();
        out.retain(|s| s.is_wildcard() || !wild.iter().any(|w| w.covers(s)));
        ScopeSet(out)
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl fmt::Display for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_space_separated())
    }
}

/// An oracle for the tests that shares no code with the above: a scope set as the finite set
/// of concrete permissions it grants over a small universe. `r:*` grants every action on `r`,
/// including [`oracle::OTHER`], which stands for every action the universe does not name (so
/// `{r:*}` is never equal to a list of named actions).
#[cfg(test)]
pub(crate) mod oracle {
    use std::collections::BTreeSet;

    pub const RESOURCES: [&str; 3] = ["calendar", "crm", "payments"];
    pub const ACTIONS: [&str; 3] = ["read", "write", "execute"];
    /// Any action not in [`ACTIONS`].
    pub const OTHER: &str = "(other)";

    /// A permission as a pair: `(resource, action)`.
    pub type Granted = BTreeSet<(String, String)>;

    /// The permissions `scopes` grant: each named one, and for `r:*` every action in
    /// [`ACTIONS`] on `r` plus `(r, OTHER)`.
    pub fn granted<S: AsRef<str>>(scopes: &[S]) -> Granted {
        let mut out = BTreeSet::new();
        for s in scopes {
            let (r, a) = s.as_ref().split_once(':').expect("resource:action");
            if a == "*" {
                for a in ACTIONS.iter().chain([&OTHER]) {
                    out.insert((r.to_string(), a.to_string()));
                }
            } else {
                out.insert((r.to_string(), a.to_string()));
            }
        }
        out
    }

    /// Whether `g` grants `action` on `resource` (an action outside [`ACTIONS`] is granted
    /// by `(resource, OTHER)`, that is by `resource:*`).
    pub fn holds(g: &Granted, resource: &str, action: &str) -> bool {
        g.contains(&(resource.to_string(), action.to_string()))
            || (!ACTIONS.contains(&action)
                && g.contains(&(resource.to_string(), OTHER.to_string())))
    }

    /// Whether holding `a` grants nothing beyond holding `b`.
    pub fn within(a: &Granted, b: &Granted) -> bool {
        a.iter().all(|(r, act)| holds(b, r, act))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn s(x: &str) -> Scope {
        x.parse().unwrap()
    }

    fn set(xs: &[&str]) -> ScopeSet {
        ScopeSet::parse(xs).unwrap()
    }

    #[test]
    fn syntax() {
        assert_eq!(s("crm:read").resource(), "crm");
        assert_eq!(s("crm:read").action(), "read");
        assert!(s("calendar:*").is_wildcard());
        for bad in [
            "crm",
            ":read",
            "crm:",
            "*:read",
            "crm:re ad",
            "crm:r*",
            "a:b:c",
            "",
        ] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        assert!("x"
            .repeat(300)
            .replace("xx", "x:")
            .parse::<Scope>()
            .is_err());
    }

    #[test]
    fn covers_and_subset() {
        assert!(s("calendar:*").covers(&s("calendar:read")));
        assert!(s("calendar:*").covers(&s("calendar:*")));
        assert!(!s("calendar:read").covers(&s("calendar:*")));
        assert!(!s("calendar:*").covers(&s("calendarx:read")));
        assert!(set(&["calendar:read"]).is_subset_of(&set(&["calendar:*", "crm:read"])));
        assert!(!set(&["crm:write"]).is_subset_of(&set(&["calendar:*", "crm:read"])));
        assert!(ScopeSet::new().is_subset_of(&ScopeSet::new()));
    }

    #[test]
    fn intersection_is_what_both_allow() {
        let a = set(&["calendar:*", "crm:read"]);
        let b = set(&["calendar:read", "crm:*", "payments:prepare"]);
        assert_eq!(a.intersection(&b), set(&["calendar:read", "crm:read"]));
        assert_eq!(
            set(&["calendar:*"]).intersection(&set(&["calendar:*", "calendar:read"])),
            set(&["calendar:*"])
        );
    }

    /// Hand-written cases, each with the answer worked out by reading the rule, not by
    /// running the code.
    #[test]
    fn wildcards_against_lists_of_actions() {
        let wild = set(&["calendar:*"]);
        let listed = set(&["calendar:read", "calendar:write"]);
        // A wildcard grants actions no list names: never within a list.
        assert!(!wild.is_subset_of(&listed));
        assert_eq!(wild.first_not_allowed_by(&listed), Some(&s("calendar:*")));
        assert!(listed.is_subset_of(&wild));
        assert_eq!(listed.first_not_allowed_by(&wild), None);
        // Not even a list of every action the tests know of.
        let all_named = set(&[
            "calendar:read",
            "calendar:write",
            "calendar:execute",
            "calendar:delete",
        ]);
        assert!(!wild.is_subset_of(&all_named));
        assert!(all_named.is_subset_of(&wild));
        // The wildcard is per resource: not a prefix, not a hierarchy, not across resources.
        assert!(!s("calendar:*").covers(&s("calendars:read")));
        assert!(!s("cal:*").covers(&s("calendar:read")));
        assert!(!s("crm:*").covers(&s("crm/leads:read")));
        assert!(!s("crm/leads:*").covers(&s("crm:read")));
        assert!(s("crm/leads:*").covers(&s("crm/leads:read")));
        assert!(!s("crm:*").covers(&s("Crm:read")), "case matters");
        assert!(!set(&["calendar:*"]).is_subset_of(&set(&["crm:*"])));
        // `*` is an action only: no resource wildcard, no partial or doubled wildcard.
        for bad in ["*:*", "crm:**", "crm:*read", "c*:read"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        // The empty set is within everything; nothing non-empty is within the empty set.
        assert!(ScopeSet::new().is_subset_of(&listed));
        assert!(!listed.is_subset_of(&ScopeSet::new()));
        assert!(!wild.is_subset_of(&ScopeSet::new()));
        // Duplicates collapse; a wildcard beside its own exact scopes is still a wildcard.
        assert_eq!(set(&["crm:read", "crm:read"]).len(), 1);
        assert!(!set(&["calendar:*", "calendar:read"]).is_subset_of(&listed));
    }

    #[test]
    fn intersections_worked_by_hand() {
        let wild = set(&["calendar:*"]);
        let listed = set(&["calendar:read", "calendar:write"]);
        assert_eq!(wild.intersection(&listed), listed);
        assert_eq!(listed.intersection(&wild), listed);
        assert_eq!(wild.intersection(&set(&["crm:*"])), ScopeSet::new());
        assert_eq!(
            set(&["calendar:*", "crm:read"]).intersection(&set(&["calendar:*", "crm:write"])),
            set(&["calendar:*"])
        );
        assert_eq!(
            set(&["crm/leads:*"]).intersection(&set(&["crm:*", "crm/leads:read"])),
            set(&["crm/leads:read"])
        );
        assert_eq!(listed.intersection(&ScopeSet::new()), ScopeSet::new());
    }

    fn scope_strategy() -> impl Strategy<Value = String> {
        (
            prop::sample::select(oracle::RESOURCES.to_vec()),
            prop::sample::select(vec!["read", "write", "execute", "delete", "*"]),
        )
            .prop_map(|(r, a)| format!("{r}:{a}"))
    }

    fn scopes_strategy() -> impl Strategy<Value = Vec<String>> {
        prop::collection::vec(scope_strategy(), 0..6)
    }

    proptest! {
        /// The subset test, `allows` and the intersection agree with the oracle. `delete`
        /// is outside the oracle's named actions, so `r:*` grants it only through OTHER.
        #[test]
        fn subset_allows_and_intersection_match_the_oracle(
            a in scopes_strategy(),
            b in scopes_strategy(),
        ) {
            use oracle::{granted, holds, within};
            let (sa, sb) = (ScopeSet::parse(&a).unwrap(), ScopeSet::parse(&b).unwrap());
            let (ga, gb) = (granted(&a), granted(&b));
            prop_assert_eq!(sa.is_subset_of(&sb), within(&ga, &gb), "{:?} within {:?}", a, b);
            for x in &a {
                let gx = granted(std::slice::from_ref(x));
                prop_assert_eq!(sb.allows(&s(x)), within(&gx, &gb), "{} allowed by {:?}", x, b);
            }
            let meet = sa.intersection(&sb);
            let gm = granted(&meet.to_strings());
            prop_assert!(within(&gm, &ga) && within(&gm, &gb), "{} grants more than both", meet);
            // Nothing both grant is lost.
            for (r, act) in ga.iter().filter(|(r, act)| holds(&gb, r, act)) {
                prop_assert!(holds(&gm, r, act), "{}:{} lost from {}", r, act, meet);
            }
        }
    }

    #[test]
    fn space_separated_round_trip() {
        let a = set(&["crm:read", "calendar:*"]);
        assert_eq!(a.to_space_separated(), "calendar:* crm:read");
        assert_eq!(
            ScopeSet::parse_space_separated("calendar:* crm:read").unwrap(),
            a
        );
    }
}
