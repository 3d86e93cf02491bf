//! Packets from the client once connected: PUBLISH and its acknowledgements in both directions,
//! SUBSCRIBE, UNSUBSCRIBE, PINGREQ and DISCONNECT.

use std::time::Instant;

use super::{Close, Connection, Step};
use crate::broker::PublishRefusal;
use crate::cluster::Forward;
use crate::codec::{
    Disconnect, Packet, Properties, PubResponse, Publish, QoS, ReasonCode, SubAck, Subscribe, UnsubAck, Unsubscribe,
};
use crate::message::{Delivery, Message, OutState};
use crate::session::Subscription;
use crate::store::Txn;
use crate::topic::{parse_filter, FilterError};

fn violation(code: ReasonCode, why: &'static str) -> Close {
    Close::Violation(code, why)
}

impl Connection {
    fn v5(&self) -> bool {
        self.io.out.version.is_v5()
    }

    pub(super) fn handle_packet(&mut self, packet: Packet) -> Step {
        match packet {
            Packet::Publish(p) => self.on_publish(p),
            Packet::PubAck(r) => self.on_puback(r),
            Packet::PubRec(r) => self.on_pubrec(r),
            Packet::PubRel(r) => {
                let (shared, state) = (&self.session.shared, &mut self.session.state);
                let mut ticket = 0;
                if state.incoming_qos2.remove(&r.packet_id) && shared.is_persistent() {
                    // PUBCOMP waits for the identifier to leave the store: were it still there
                    // after a restart, a new message with the same identifier would be taken
                    // for a duplicate and lost.
                    let mut txn = Txn::default();
                    txn.remove_incoming(&self.client.client_id, r.packet_id);
                    ticket = self.broker.store().commit(txn);
                }
                // Mosquitto answers an unknown identifier with success too, as the vectors record.
                self.send_ack(ticket, Packet::PubComp(PubResponse::new(r.packet_id, ReasonCode::SUCCESS)));
                Ok(())
            }
            Packet::PubComp(r) => self.on_pubcomp(r),
            Packet::Subscribe(s) => self.on_subscribe(s),
            Packet::Unsubscribe(u) => self.on_unsubscribe(u),
            Packet::PingReq => {
                self.io.out.packet(&Packet::PingResp);
                Ok(())
            }
            Packet::Disconnect(d) => self.on_disconnect(d),
            // The decoder refuses every other packet from a client.
            other => Err(violation(ReasonCode::PROTOCOL_ERROR, other.name())),
        }
    }

    fn on_publish(&mut self, mut p: Publish) -> Step {
        let v5 = self.v5();
        if v5 {
            if let Some(alias) = p.properties.topic_alias.take() {
                if alias == 0 || alias > self.broker.config().mqtt.topic_alias_maximum {
                    return Err(violation(ReasonCode::TOPIC_ALIAS_INVALID, "[MQTT-3.3.2-8] topic alias out of range"));
                }
                if p.topic.is_empty() {
                    match self.client.inbound_aliases.get(&alias) {
                        Some(t) => p.topic = t.to_string(),
                        None => {
                            return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-3.3.4-7] unknown topic alias"))
                        }
                    }
                } else {
                    self.client.inbound_aliases.insert(alias, p.topic.as_str().into());
                }
            } else if p.topic.is_empty() {
                return Err(violation(ReasonCode::MALFORMED_PACKET, "[MQTT-3.3.2-1] empty topic name without alias"));
            }
        }
        // The rules every publish path shares (`Broker::admit_publish`): a topic too long or too
        // deep closes the connection; `$SYS` and degraded mode are answered below.
        let admitted = self.broker.admit_publish(&p.topic, &self.client.limits);
        match admitted {
            Err(PublishRefusal::TopicTooLong) => {
                return Err(violation(ReasonCode::TOPIC_NAME_INVALID, "topic name longer than max_topic_length"));
            }
            Err(PublishRefusal::TooManyLevels) => {
                return Err(violation(
                    ReasonCode::TOPIC_NAME_INVALID,
                    "topic name has more levels than max_topic_levels",
                ));
            }
            _ => {}
        }
        let state = &mut self.session.state;
        let duplicate_qos2 = p.qos == QoS::ExactlyOnce && state.incoming_qos2.contains(&p.packet_id);
        if p.qos == QoS::ExactlyOnce
            && !duplicate_qos2
            && v5
            && state.incoming_qos2.len() >= usize::from(self.broker.config().mqtt.receive_maximum)
        {
            return Err(violation(ReasonCode::RECEIVE_MAXIMUM_EXCEEDED, "[MQTT-3.3.4-9] receive maximum exceeded"));
        }
        let mut reason = ReasonCode::SUCCESS;
        let mut ticket = 0;
        let mut replicated = 0;
        let mut message_id = None;
        let wants_id = match self.client.msg_id_on_ack {
            super::MsgIdOnAck::Never => false,
            super::MsgIdOnAck::Always => true,
            super::MsgIdOnAck::OnRequest => p
                .properties
                .user_properties
                .iter()
                .any(|(k, _)| k == crate::receipt::STORY_ID || k == crate::receipt::RECEIPT_REQUEST),
        };
        let shed = admitted == Err(PublishRefusal::Degraded);
        if shed && !v5 && p.qos > QoS::AtMostOnce {
            // 3.1.1 cannot be told 0x97: closing without an acknowledgement leaves the story
            // with the publisher, which sends it again once it reconnects.
            return Err(Close::Overloaded);
        }
        if p.properties.payload_format_indicator == Some(1) && std::str::from_utf8(&p.payload).is_err() {
            reason = ReasonCode(0x99);
        } else if admitted == Err(PublishRefusal::SysTopic) {
            // [MQTT-4.7.2-1] `$SYS` belongs to the broker: never routed; 5.0 is told why, 3.1.1
            // is acknowledged as Mosquitto does.
            reason = ReasonCode::NOT_AUTHORIZED;
        } else if self.over_publish_rate() {
            self.broker.metrics().limit_publish_rate.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            reason = ReasonCode::QUOTA_EXCEEDED;
        } else if self.client.acl.as_ref().is_some_and(|acl| !acl.can_publish(&p.topic)) {
            // Not routed; 5.0 learns why from the acknowledgement, 3.1.1 has no way to be told.
            self.broker.metrics().acl_denied_publish.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(
                client_id = self.client.client_id.as_str(),
                topic = p.topic.as_str(),
                "PUBLISH denied by the ACL"
            );
            reason = ReasonCode::NOT_AUTHORIZED;
        } else if shed {
            // Degraded mode: normal traffic is refused while high priority keeps flowing, and
            // the publisher is not read from for a moment: refusing at full speed would only
            // invite it to send faster.
            reason = ReasonCode::QUOTA_EXCEEDED;
            self.flow.paused_until = Some(Instant::now() + super::SHED_PAUSE);
        } else if !duplicate_qos2 {
            let mut properties = std::mem::take(&mut p.properties);
            properties.subscription_identifiers.clear();
            let expiry_interval = properties.message_expiry_interval.take();
            let message = Message {
                properties,
                expiry_interval,
                publisher: Some(self.session.shared.id),
                ..Message::new(p.topic, p.payload, p.qos, p.retain)
            };
            match self.broker.accept_message(message) {
                // A retry of a story already accepted: acknowledged, with the first one's id.
                Err(original) => message_id = Some(original),
                Ok(message) => {
                    message_id = Some(message.id);
                    // Cluster mode: the other nodes get it too; at QoS 1 and 2 the
                    // acknowledgement waits until JetStream has it.
                    let forward = self.broker.cluster().map(|link| link.forward(&message));
                    if forward == Some(Forward::Full) {
                        if !v5 {
                            return Err(Close::Overloaded);
                        }
                        self.broker.metrics().cluster_refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        reason = ReasonCode::QUOTA_EXCEEDED;
                    } else {
                        if let Some(Forward::Ticket(t)) = forward {
                            replicated = t;
                        }
                        let outcome = self.broker.route(message, true);
                        ticket = outcome.ticket;
                        // In cluster mode another node may have subscribers: 0x10 would be a guess.
                        if outcome.matched == 0 && p.qos == QoS::AtLeastOnce && forward.is_none() {
                            reason = ReasonCode::NO_MATCHING_SUBSCRIBERS;
                        }
                        self.flow.blocked.extend(outcome.blocked);
                    }
                }
            }
        }
        let reason = if v5 { reason } else { ReasonCode::SUCCESS };
        let mut response = PubResponse::new(p.packet_id, reason);
        if let (true, Some(id)) = (wants_id, message_id) {
            // The delivery receipt's key, for the publisher to look up [issue 7].
            let id = crate::receipt::message_id_text(id);
            response.properties.user_properties.push((crate::receipt::MSG_ID_PROPERTY.to_owned(), id));
        }
        let ack = match p.qos {
            QoS::AtMostOnce => return Ok(()),
            QoS::AtLeastOnce => Packet::PubAck(response),
            QoS::ExactlyOnce => {
                let (shared, state) = (&self.session.shared, &mut self.session.state);
                let reason = if reason == ReasonCode::NO_MATCHING_SUBSCRIBERS { ReasonCode::SUCCESS } else { reason };
                if !reason.is_error() && state.incoming_qos2.insert(p.packet_id) && shared.is_persistent() {
                    let mut txn = Txn::default();
                    txn.put_incoming(&self.client.client_id, p.packet_id);
                    ticket = ticket.max(self.broker.store().commit(txn));
                }
                response.reason = reason;
                Packet::PubRec(response)
            }
        };
        // The acknowledgement is the promise: it waits until every subscriber has the message
        // and the store has what persistent sessions need of it.
        if self.flow.blocked.is_empty() {
            self.send_ack_after(ticket, replicated, ack);
        } else {
            self.flow.held_ack = Some(Box::new((ticket, replicated, ack)));
        }
        Ok(())
    }

    /// `publish_rate_per_client`, counted per whole second of the broker's uptime.
    fn over_publish_rate(&mut self) -> bool {
        let rate = self.client.limits.publish_rate_per_client;
        if rate == 0 {
            return false;
        }
        let second = self.broker.uptime_secs() as u32;
        if second != self.client.publish_second {
            self.client.publish_second = second;
            self.client.publishes_this_second = 0;
        }
        self.client.publishes_this_second += 1;
        self.client.publishes_this_second > rate
    }

    fn inflight_state(&self, packet_id: u16) -> Option<OutState> {
        let state = &self.session.state;
        state.inflight.iter().find(|m| m.packet_id == packet_id).map(|m| m.state)
    }

    fn complete(&mut self, packet_id: u16) {
        let state = &mut self.session.state;
        // Acknowledgements come mostly in order, so the search usually stops at the front.
        if let Some(pos) = state.inflight.iter().position(|m| m.packet_id == packet_id) {
            if let Some(m) = state.inflight.remove(pos) {
                // The time this input was read: close enough, and no clock reading per ack.
                self.broker.record_acknowledged(&m.delivery.message, self.io.last_inbound);
                // [issue 4] a message leaves the durable queue only with its PUBACK or PUBCOMP.
                self.forget_stored(&m.delivery);
            }
        }
    }

    fn on_puback(&mut self, r: PubResponse) -> Step {
        match self.inflight_state(r.packet_id) {
            Some(OutState::AwaitPubAck) => self.complete(r.packet_id),
            Some(_) => return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-4.3.3] PUBACK for a QoS 2 message")),
            None => {}
        }
        Ok(())
    }

    fn on_pubrec(&mut self, r: PubResponse) -> Step {
        match self.inflight_state(r.packet_id) {
            Some(OutState::AwaitPubAck) => {
                return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-4.3.2] PUBREC for a QoS 1 message"))
            }
            Some(OutState::AwaitPubRec) if r.reason.is_error() => self.complete(r.packet_id),
            Some(OutState::AwaitPubRec) => {
                let state = &mut self.session.state;
                let mut received = None;
                if let Some(m) = state.inflight.iter_mut().find(|m| m.packet_id == r.packet_id) {
                    m.state = OutState::AwaitPubComp;
                    received = Some(m.delivery.message.id);
                    if let Some(at) = m.delivery.queue_ref() {
                        let mut txn = Txn::default();
                        let entry = crate::store::records::QueueEntry::of(
                            &m.delivery,
                            Some((r.packet_id, OutState::AwaitPubComp)),
                        );
                        txn.update_entry(&self.client.client_id, at, &entry);
                        self.broker.store().commit(txn);
                    }
                }
                if let Some(id) = received {
                    self.note_qos2_received(id, r.packet_id);
                }
                self.send_pubrel(r.packet_id);
            }
            Some(OutState::AwaitPubComp) => self.send_pubrel(r.packet_id),
            None if !r.reason.is_error() => {
                self.io.out.packet(&Packet::PubRel(PubResponse::new(r.packet_id, ReasonCode::SUCCESS)));
            }
            None => {}
        }
        Ok(())
    }

    /// Cluster mode: message `id` of a persistent session was received at QoS 2; the ledger
    /// that says so is written before the PUBREL goes (`send_pubrel`), so that a message the
    /// client completed is never delivered again by a node taking the session over from this
    /// one if it dies [MQTT-4.3.3-1].
    fn note_qos2_received(&mut self, id: u64, packet_id: u16) {
        let Some(link) = self.broker.cluster() else { return };
        if id == 0 || !self.session.shared.is_persistent() {
            return;
        }
        let ledger = self.session.state.qos2_received.get_or_insert_with(Default::default);
        if ledger.received.len() >= crate::cluster::QOS2_LEDGER {
            ledger.received.pop_front();
        }
        ledger.received.push_back((id, packet_id));
        match link.record_qos2_received(&self.client.client_id, &ledger.received) {
            Some(ticket) => ledger.ticket = ticket,
            // The append queue is full: this exchange goes on without its record (a node
            // taking the session over could deliver this message again).
            None => {
                link.figures.qos2_unrecorded.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// PUBREL, once the ledger of received QoS 2 messages is in JetStream (cluster mode).
    fn send_pubrel(&mut self, packet_id: u16) {
        let ticket = self.session.state.qos2_received.as_ref().map_or(0, |l| l.ticket);
        self.send_ack_after(0, ticket, Packet::PubRel(PubResponse::new(packet_id, ReasonCode::SUCCESS)));
    }

    fn on_pubcomp(&mut self, r: PubResponse) -> Step {
        match self.inflight_state(r.packet_id) {
            Some(OutState::AwaitPubComp) => self.complete(r.packet_id),
            Some(_) => {
                return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-4.3.3] PUBCOMP before PUBREC"));
            }
            None => {}
        }
        Ok(())
    }

    fn on_subscribe(&mut self, s: Subscribe) -> Step {
        let v5 = self.v5();
        let identifier = s.properties.subscription_identifiers.first().copied();
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut retained: Vec<Delivery> = Vec::new();
        let (shared, state) = (&self.session.shared, &mut self.session.state);
        let persistent = shared.is_persistent();
        let mut txn = Txn::default();
        for (filter, options) in &s.filters {
            let parsed = match parse_filter(filter) {
                Ok(p) => p,
                Err(FilterError::BadShare) => {
                    return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-4.8.2-1] invalid shared subscription"))
                }
                Err(FilterError::Invalid) => {
                    reasons.push(if v5 { ReasonCode::TOPIC_FILTER_INVALID } else { ReasonCode::UNSPECIFIED_ERROR });
                    continue;
                }
            };
            let max_subscriptions = self.client.limits.max_subscriptions_per_client;
            if max_subscriptions > 0
                && state.subscriptions.len() >= max_subscriptions
                && !state.subscriptions.contains_key(filter.as_str())
            {
                self.broker.metrics().limit_subscriptions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reasons.push(if v5 { ReasonCode::QUOTA_EXCEEDED } else { ReasonCode::UNSPECIFIED_ERROR });
                continue;
            }
            if filter.len() > self.client.limits.max_topic_length {
                self.broker.metrics().limit_topic_length.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reasons.push(if v5 { ReasonCode::TOPIC_FILTER_INVALID } else { ReasonCode::UNSPECIFIED_ERROR });
                continue;
            }
            if crate::topic::levels(parsed.filter) > self.broker.config().mqtt.max_topic_levels {
                reasons.push(if v5 { ReasonCode::TOPIC_FILTER_INVALID } else { ReasonCode::UNSPECIFIED_ERROR });
                continue;
            }
            if parsed.share.is_some() && options.no_local {
                return Err(violation(ReasonCode::PROTOCOL_ERROR, "[MQTT-3.8.3-4] no local on a shared subscription"));
            }
            if self.client.acl.as_ref().is_some_and(|acl| !acl.can_subscribe(parsed.filter)) {
                self.broker.metrics().acl_denied_subscribe.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                reasons.push(if v5 { ReasonCode::NOT_AUTHORIZED } else { ReasonCode::UNSPECIFIED_ERROR });
                continue;
            }
            let sub = Subscription { session: shared.clone(), options: *options, identifier };
            let existed = self.broker.subscribe(&parsed, sub);
            state.subscriptions.insert(filter.clone(), (*options, identifier));
            if persistent {
                txn.put_subscription(&self.client.client_id, filter, options, identifier);
            }
            reasons.push(ReasonCode(options.qos as u8));
            let send_retained = parsed.share.is_none()
                && match options.retain_handling {
                    0 => true,
                    1 => !existed,
                    _ => false,
                };
            if send_retained {
                let matching = self.broker.retained_matching(parsed.filter);
                retained.extend(matching.into_iter().map(|message| Delivery {
                    qos: message.qos.min(options.qos),
                    message,
                    // [MQTT-3.3.1-8] retained messages sent on subscribe keep their retain flag.
                    retain: true,
                    subscription_ids: identifier.into_iter().collect(),
                    stored: None,
                }));
            }
        }
        let room = self.broker.config().mqtt.max_pending_retained.saturating_sub(state.pending.len());
        if retained.len() > room {
            let dropped = retained.len() - room;
            // Once per connection: a client re-subscribing `#` in a loop would write a line each time.
            if !std::mem::replace(&mut self.client.warned_retained, true) && crate::logging::connection_line() {
                tracing::warn!(
                    client_id = self.client.client_id.as_str(),
                    dropped,
                    "retained messages beyond max_pending_retained dropped (said once per connection)"
                );
            }
            self.broker
                .metrics()
                .messages_dropped_queue_full
                .fetch_add(dropped as u64, std::sync::atomic::Ordering::Relaxed);
            retained.truncate(room);
        }
        self.note_subscription_count();
        self.record_in_cluster();
        // The SUBACK promises the subscription, so it waits for the store like a PUBACK, and in
        // cluster mode for the other nodes to know this node now wants those topics.
        let ticket = self.broker.store().commit(txn);
        let interest = self.broker.cluster().map_or(0, |l| l.own.issued());
        self.send_suback(
            ticket,
            interest,
            Packet::SubAck(SubAck { packet_id: s.packet_id, properties: Properties::default(), reasons }),
        );
        // The retained messages follow their SUBACK, also when it waits.
        let waits = matches!(self.flow.acks.back(), Some((_, _, _, Packet::SubAck(a))) if a.packet_id == s.packet_id);
        if waits && !retained.is_empty() {
            self.flow.after_suback.get_or_insert_with(Default::default).push_back((s.packet_id, retained));
        } else {
            for d in retained {
                self.session.state.push_pending(d);
            }
        }
        Ok(())
    }

    fn on_unsubscribe(&mut self, u: Unsubscribe) -> Step {
        let (shared, state) = (&self.session.shared, &mut self.session.state);
        let mut reasons = Vec::with_capacity(u.filters.len());
        let mut txn = Txn::default();
        for filter in &u.filters {
            let existed = state.subscriptions.remove(filter).is_some();
            if existed {
                if let Ok(parsed) = parse_filter(filter) {
                    self.broker.unsubscribe(shared.id, &parsed);
                }
                if shared.is_persistent() {
                    txn.remove_subscription(&self.client.client_id, filter);
                }
            }
            reasons.push(if existed { ReasonCode::SUCCESS } else { ReasonCode::NO_SUBSCRIPTION_EXISTED });
        }
        if !self.v5() {
            reasons.clear();
        }
        self.note_subscription_count();
        self.record_in_cluster();
        let ticket = self.broker.store().commit(txn);
        self.send_ack(
            ticket,
            Packet::UnsubAck(UnsubAck { packet_id: u.packet_id, properties: Properties::default(), reasons }),
        );
        Ok(())
    }

    /// Cluster mode: a persistent session's subscriptions changed; its directory record says so,
    /// for the node its client may come back to.
    fn record_in_cluster(&self) {
        let (shared, state) = (&self.session.shared, &self.session.state);
        if let (Some(link), true) = (self.broker.cluster(), shared.is_persistent()) {
            let will = self.client.will.as_deref().cloned();
            link.record_connected(
                &self.client.client_id,
                state.expiry_interval,
                will,
                &state.subscriptions,
                shared.owner(),
            );
        }
    }

    /// Keeps the admin API's count of this client's subscriptions.
    fn note_subscription_count(&self) {
        let (shared, state) = (&self.session.shared, &self.session.state);
        shared.set_subscription_count(state.subscriptions.len());
    }

    fn on_disconnect(&mut self, d: Disconnect) -> Step {
        if let Some(expiry) = d.properties.session_expiry_interval {
            if self.client.session_expiry == 0 && expiry != 0 {
                return Err(violation(
                    ReasonCode::PROTOCOL_ERROR,
                    "[MQTT-3.14.2-2] session expiry set on DISCONNECT after 0 on CONNECT",
                ));
            }
            self.client.session_expiry = expiry;
        }
        Err(Close::ClientDisconnect { with_will: d.reason == ReasonCode::DISCONNECT_WITH_WILL })
    }
}
