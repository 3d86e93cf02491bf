//! Topic names and filters outside the tree: splitting a `$share/` filter into its group and
//! filter [MQTT-4.8.2], and matching one filter against one topic name [MQTT-4.7]. Used by the
//! router, the ACL, queue policies, priority classes and receipts alike.

/// A filter of a SUBSCRIBE, split into its optional share name and the filter proper.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParsedFilter<'a> {
    pub share: Option<&'a str>,
    pub filter: &'a str,
}

#[derive(Debug, PartialEq, Eq)]
pub enum FilterError {
    /// `$share/` syntax broken: a protocol error [MQTT-4.8.2-1], [MQTT-4.8.2-2].
    BadShare,
    /// Wildcards in the wrong place [MQTT-4.7.1-1..3].
    Invalid,
}

/// Whether a (non-shared) filter matches a topic name, outside the tree: for the few rules in
/// configuration, such as queue policies. `$` topics match no leading wildcard [MQTT-4.7.2-1].
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for f in filter.split('/') {
        match (f, topic_levels.next()) {
            ("#", _) => return true,
            ("+", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    topic_levels.next().is_none()
}

pub fn parse_filter(full: &str) -> Result<ParsedFilter<'_>, FilterError> {
    if let Some(rest) = full.strip_prefix("$share/") {
        let (share, filter) = rest.split_once('/').ok_or(FilterError::BadShare)?;
        if share.is_empty() || share.contains(['+', '#']) || filter.is_empty() {
            return Err(FilterError::BadShare);
        }
        if !crate::codec::is_valid_topic_filter(filter) {
            return Err(FilterError::Invalid);
        }
        return Ok(ParsedFilter { share: Some(share), filter });
    }
    if !crate::codec::is_valid_topic_filter(full) {
        return Err(FilterError::Invalid);
    }
    Ok(ParsedFilter { share: None, filter: full })
}

/// Whether a topic is in the broker's own `$SYS` tree: the one test of the prefix for every
/// publish path (MQTT and HTTP) and for routing [MQTT-4.7.2-1].
pub fn is_sys(topic: &str) -> bool {
    topic == "$SYS" || topic.starts_with("$SYS/")
}

/// The number of levels of a topic name or filter.
pub fn levels(topic: &str) -> usize {
    topic.bytes().filter(|&b| b == b'/').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_is_the_whole_first_level() {
        assert!(is_sys("$SYS/broker/uptime"));
        assert!(is_sys("$SYS"));
        assert!(!is_sys("$SYSTEM/x"));
        assert!(!is_sys("news/$SYS"));
    }

    #[test]
    fn parse_filter_splits_shares_mqtt_4_8_2() {
        assert_eq!(parse_filter("$share/g/news/#").unwrap(), ParsedFilter { share: Some("g"), filter: "news/#" });
        assert_eq!(parse_filter("$share//x"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("$share/g"), Err(FilterError::BadShare));
        assert_eq!(parse_filter("news/#/x"), Err(FilterError::Invalid));
        assert_eq!(levels("a/b/c"), 3);
    }
}
