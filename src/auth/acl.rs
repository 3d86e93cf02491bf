//! Access control lists in Mosquitto's `acl_file` format:
//!
//! ```text
//! # rules before any `user` line apply to clients without a user name
//! topic read news/#
//! user editor
//! topic readwrite news/#
//! # `pattern` rules apply to every client; %u is the user name, %c the client identifier
//! pattern read users/%u/#
//! ```
//!
//! `topic [read|write|readwrite|deny] TOPIC` (no access word means readwrite). Once a file is
//! given, what no rule allows is denied; a matching `deny` rule wins over any allow. A user name
//! or client identifier containing `+`, `#` or `/` never takes part in a pattern, so it cannot
//! widen one (`users/%u/#` with user `#` would otherwise read every inbox).

use std::collections::HashMap;
use std::path::Path;

use super::AuthError;
use crate::topic::filter_matches;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn allows(self, want: Want) -> bool {
        matches!((self, want), (Access::ReadWrite, _) | (Access::Read, Want::Read) | (Access::Write, Want::Write))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Want {
    Read,
    Write,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    access: Access,
    topic: String,
}

impl Rule {
    pub fn new(access: Access, topic: String) -> Rule {
        Rule { access, topic }
    }
}

#[derive(Clone, Debug, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

fn has_wildcard_or_separator(s: &str) -> bool {
    s.contains(['+', '#', '/'])
}

/// Whether subscribing to `filter` asks for nothing beyond what the rule `rule` grants: every
/// topic `filter` can match, `rule` matches too (`news/#` covers `news/+/breaking`; `news/+` does
/// not cover `news/#`).
pub fn filter_covered_by(rule: &str, filter: &str) -> bool {
    if filter.starts_with('$') != rule.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    for r in rule.split('/') {
        match (r, f.next()) {
            ("#", _) => return true,
            ("+", Some(level)) if level != "#" => {}
            (r, Some(level)) if r == level && r != "+" => {}
            _ => return false,
        }
    }
    f.next().is_none()
}

impl Acl {
    pub fn load(path: &Path) -> Result<Acl, AuthError> {
        super::load_file(path, Self::parse)
    }

    pub fn parse(text: &str) -> Result<Acl, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim();
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err((n + 1, "`user` needs a name".into()));
                    }
                    user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let (access, topic) = match rest.split_once(char::is_whitespace) {
                        Some(("read", t)) => (Access::Read, t.trim()),
                        Some(("write", t)) => (Access::Write, t.trim()),
                        Some(("readwrite", t)) => (Access::ReadWrite, t.trim()),
                        Some(("deny", t)) => (Access::Deny, t.trim()),
                        _ => (Access::ReadWrite, rest),
                    };
                    let checked = topic.replace("%u", "u").replace("%c", "c");
                    if topic.is_empty() || !crate::codec::is_valid_topic_filter(&checked) {
                        return Err((n + 1, format!("{topic:?} is not a topic filter")));
                    }
                    let rule = Rule { access, topic: topic.to_owned() };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, None) => acl.anonymous.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                    }
                }
                other => return Err((n + 1, format!("unknown keyword {other:?}"))),
            }
        }
        Ok(acl)
    }

    /// The rules that apply to a client, patterns filled in. `given`: the user's rules from the
    /// auth service, in place of the file's `user` section.
    fn rules_for(&self, username: Option<&str>, client_id: &str, given: Option<&[Rule]>) -> Vec<Rule> {
        let mut rules = match (given, username) {
            (Some(given), _) => given.to_vec(),
            (None, None) => self.anonymous.clone(),
            (None, Some(u)) => self.users.get(u).cloned().unwrap_or_default(),
        };
        for p in &self.patterns {
            let uses_user = p.topic.contains("%u");
            let uses_client = p.topic.contains("%c");
            if uses_user && username.is_none_or(has_wildcard_or_separator) {
                continue;
            }
            if uses_client && has_wildcard_or_separator(client_id) {
                continue;
            }
            let topic = p.topic.replace("%u", username.unwrap_or("")).replace("%c", client_id);
            rules.push(Rule { access: p.access, topic });
        }
        rules
    }

    /// The rules of one client, resolved once at CONNECT.
    pub fn for_client(&self, username: Option<&str>, client_id: &str) -> ClientAcl {
        ClientAcl { rules: self.rules_for(username, client_id, None) }
    }

    /// `for_client`, with the auth service's rules for the user in place of the file's.
    pub fn for_client_with(&self, username: Option<&str>, client_id: &str, given: &[Rule]) -> ClientAcl {
        ClientAcl { rules: self.rules_for(username, client_id, Some(given)) }
    }
}

/// One client's rules: what its connection consults on PUBLISH, SUBSCRIBE and delivery.
#[derive(Clone, Debug, Default)]
pub struct ClientAcl {
    rules: Vec<Rule>,
}

impl ClientAcl {
    /// Only these rules (the auth service's, with no ACL file).
    pub fn from_rules(rules: Vec<Rule>) -> ClientAcl {
        ClientAcl { rules }
    }

    fn decide(&self, want: Want, matches: impl Fn(&str) -> bool) -> bool {
        let mut allowed = false;
        for r in &self.rules {
            if matches(&r.topic) {
                if r.access == Access::Deny {
                    return false;
                }
                allowed |= r.access.allows(want);
            }
        }
        allowed
    }

    pub fn can_publish(&self, topic: &str) -> bool {
        self.decide(Want::Write, |rule| filter_matches(rule, topic))
    }

    /// Whether a message on `topic` may be delivered to this client (checked per message, so
    /// retained messages and resumed sessions obey the rules of the current connection).
    pub fn can_read(&self, topic: &str) -> bool {
        self.decide(Want::Read, |rule| filter_matches(rule, topic))
    }

    /// Whether the client may subscribe to `filter` (as a whole).
    pub fn can_subscribe(&self, filter: &str) -> bool {
        // A deny rule inside the filter (`news/embargoed/#` under `news/#`) does not refuse the
        // subscription; it stops those messages one by one in `can_read`.
        self.decide(Want::Read, |rule| filter_covered_by(rule, filter))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
# anonymous: nothing
user editor
topic write news/#
topic read news/#
user admin
topic read $SYS/#
topic readwrite #
pattern read news/#
pattern read users/%u/#
pattern deny news/embargoed/#
";

    #[test]
    fn the_newsroom_policy_of_docs_security() {
        let acl = Acl::parse(POLICY).unwrap();
        let editor = acl.for_client(Some("editor"), "cms-1");
        assert!(editor.can_publish("news/tech/ai"));
        assert!(!editor.can_publish("users/alice/inbox"));
        let app = acl.for_client(Some("alice"), "phone-1");
        assert!(app.can_subscribe("news/#") && app.can_subscribe("news/+/breaking"));
        assert!(!app.can_publish("news/tech/ai"));
        assert!(app.can_subscribe("users/alice/#") && app.can_read("users/alice/inbox"));
        assert!(!app.can_read("users/bob/inbox") && !app.can_subscribe("users/#"));
        assert!(!app.can_read("$SYS/broker/uptime") && !app.can_subscribe("$SYS/#"));
        assert!(!app.can_read("news/embargoed/x"), "deny wins");
        assert!(!app.can_subscribe("news/embargoed/#"));
        let admin = acl.for_client(Some("admin"), "ops");
        assert!(admin.can_subscribe("$SYS/#") && admin.can_read("$SYS/broker/uptime"));
        assert!(!admin.can_publish("$SYS/broker/uptime"), "# does not reach $ topics");
        let anonymous = acl.for_client(None, "x");
        assert!(anonymous.can_read("news/a"), "patterns apply to every client");
        assert!(!anonymous.can_read("users//inbox"), "a %u pattern does not apply without a user name");
        assert!(!anonymous.can_publish("news/a"));
    }

    #[test]
    fn a_wildcard_user_name_never_widens_a_pattern() {
        let acl = Acl::parse("pattern read users/%u/#\npattern read devices/%c/#\n").unwrap();
        for name in ["#", "+", "a/b", "x+"] {
            let c = acl.for_client(Some(name), name);
            assert!(!c.can_read("users/bob/inbox"), "user {name:?}");
            assert!(!c.can_subscribe("users/#"), "user {name:?}");
            assert!(!c.can_read("devices/bob/x"), "client {name:?}");
        }
        let ok = acl.for_client(Some("bob"), "bob-phone");
        assert!(ok.can_read("users/bob/inbox") && ok.can_read("devices/bob-phone/x"));
    }

    #[test]
    fn coverage_of_a_filter_by_a_rule() {
        assert!(filter_covered_by("news/#", "news/+/breaking"));
        assert!(filter_covered_by("news/#", "news"));
        assert!(filter_covered_by("news/+", "news/+"));
        assert!(!filter_covered_by("news/+", "news/#"));
        assert!(!filter_covered_by("news/tech", "news/+"));
        assert!(!filter_covered_by("#", "$SYS/#"));
    }

    #[test]
    fn bad_lines_are_refused_with_their_number() {
        assert_eq!(Acl::parse("user a\ntopic read news/#/x\n").unwrap_err().0, 2);
        assert_eq!(Acl::parse("topik read x\n").unwrap_err().0, 1);
    }
}
