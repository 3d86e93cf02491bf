//! Retained messages [MQTT-3.3.1-5]: one per topic, in a tree of literal topic levels that a
//! subscriber's filter walks. In memory for now; the durability work moves it to the store.

use std::collections::HashMap;
use std::sync::Arc;

use crate::message::Message;

#[derive(Default)]
struct Node {
    children: HashMap<Box<str>, Node>,
    message: Option<Arc<Message>>,
}

#[derive(Default)]
pub struct RetainedStore {
    root: Node,
    count: usize,
    /// Payload bytes of the retained messages, for `$SYS/broker/store/messages/bytes`.
    bytes: usize,
}

impl RetainedStore {
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Stores the message, or with an empty payload deletes what the topic held [MQTT-3.3.1-6].
    pub fn set(&mut self, message: Arc<Message>) {
        let levels: Vec<&str> = message.topic.split('/').collect();
        if message.payload.is_empty() {
            if let Some(old) = remove(&mut self.root, &levels) {
                self.count -= 1;
                self.bytes -= old.payload.len();
            }
            return;
        }
        let mut node = &mut self.root;
        for level in levels {
            node = node.children.entry(level.into()).or_default();
        }
        self.bytes += message.payload.len();
        match node.message.replace(message) {
            None => self.count += 1,
            Some(old) => self.bytes -= old.payload.len(),
        }
    }

    pub fn payload_bytes(&self) -> usize {
        self.bytes
    }

    /// Every unexpired retained message whose topic matches `filter`.
    pub fn matching(&self, filter: &str) -> Vec<Arc<Message>> {
        let levels: Vec<&str> = filter.split('/').collect();
        let mut out = Vec::new();
        walk(&self.root, &levels, true, &mut out);
        let now = std::time::Instant::now();
        out.retain(|m| !m.is_expired(now));
        out
    }
}

fn remove(node: &mut Node, levels: &[&str]) -> Option<Arc<Message>> {
    let Some((first, rest)) = levels.split_first() else {
        return node.message.take();
    };
    let child = node.children.get_mut(*first)?;
    let removed = remove(child, rest);
    if child.message.is_none() && child.children.is_empty() {
        node.children.remove(*first);
    }
    removed
}

fn walk(node: &Node, filter: &[&str], root: bool, out: &mut Vec<Arc<Message>>) {
    let Some((first, rest)) = filter.split_first() else {
        out.extend(node.message.iter().cloned());
        return;
    };
    match *first {
        "#" => {
            // `#` also matches the parent level itself [MQTT-4.7.1-2].
            out.extend(node.message.iter().cloned());
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    all(child, out);
                }
            }
        }
        "+" => {
            for (name, child) in &node.children {
                if !(root && name.starts_with('$')) {
                    walk(child, rest, false, out);
                }
            }
        }
        literal => {
            if let Some(child) = node.children.get(literal) {
                walk(child, rest, false, out);
            }
        }
    }
}

fn all(node: &Node, out: &mut Vec<Arc<Message>>) {
    out.extend(node.message.iter().cloned());
    for child in node.children.values() {
        all(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::QoS;

    fn msg(topic: &str, payload: &'static [u8]) -> Arc<Message> {
        Arc::new(Message::new_for_test(topic, payload, QoS::AtMostOnce, true))
    }

    fn topics(store: &RetainedStore, filter: &str) -> Vec<String> {
        let mut v: Vec<String> = store.matching(filter).iter().map(|m| m.topic.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn set_replace_delete_mqtt_3_3_1_5_and_6() {
        let mut s = RetainedStore::default();
        s.set(msg("news/tech", b"a"));
        s.set(msg("news/tech", b"b"));
        s.set(msg("news", b"cc"));
        assert_eq!((s.len(), s.payload_bytes()), (2, 3));
        assert_eq!(&s.matching("news/tech")[0].payload[..], b"b");
        s.set(msg("news/tech", b""));
        assert_eq!((s.len(), s.payload_bytes()), (1, 2));
        assert_eq!(topics(&s, "news/#"), vec!["news"]);
    }

    #[test]
    fn filters_walk_the_tree_and_skip_dollar_topics_at_the_root() {
        let mut s = RetainedStore::default();
        for t in ["news/tech/ai", "news/sport", "news", "$SYS/broker/uptime", "other"] {
            s.set(msg(t, b"x"));
        }
        assert_eq!(topics(&s, "news/#"), vec!["news", "news/sport", "news/tech/ai"]);
        assert_eq!(topics(&s, "news/+"), vec!["news/sport"]);
        assert_eq!(topics(&s, "#"), vec!["news", "news/sport", "news/tech/ai", "other"]);
        assert_eq!(topics(&s, "+/broker/+"), Vec::<String>::new());
        assert_eq!(topics(&s, "$SYS/#"), vec!["$SYS/broker/uptime"]);
    }
}
