//! The CONNECT handshake [MQTT-3.1.4]: validate the CONNECT, take over or create the session,
//! and answer with a CONNACK.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::{Client, Close, Held, Io, Retry};
use crate::broker::Broker;
use crate::codec::{ConnAck, Connect, ErrorKind, Packet, Properties, ProtocolVersion, ReasonCode};
use crate::session::registry::{Claim, ClaimError};
use crate::session::Kick;

/// A connection before its CONNECT is accepted: it has no session yet.
pub(super) struct Handshake {
    pub broker: Arc<Broker>,
    pub conn_id: u64,
    pub peer: std::net::SocketAddr,
    pub io: Io,
    pub client: Client,
    pub retry: Retry,
    /// Handed to the registry with the claim, for it to ask this connection to let go later.
    pub kick_tx: Option<tokio::sync::oneshot::Sender<Kick>>,
    pub loopback: bool,
    /// Its listener's index, for the admin API and the dashboard.
    pub listener: u8,
    pub certificate_name: Option<Box<str>>,
}

type Accepted = Result<(Held, bool), Close>;

impl Handshake {
    /// A connection refused before it had a session: its CONNACK (if any) is flushed, nothing
    /// else happens.
    pub(super) async fn refused(mut self, close: Close) {
        tracing::debug!(peer = %self.peer, reason = %close.describe(), "connection closed before CONNECT completed");
        let answered = self.io.close(&self.broker, self.peer, self.client.counted_ip, &close).await;
        self.io.end(&self.broker, answered);
    }

    /// Reads the CONNECT and accepts it: the claimed session and whether it was resumed.
    pub(super) async fn handshake(&mut self) -> Accepted {
        let timeout = Duration::from_secs(self.broker.config().mqtt.connect_timeout);
        let deadline = tokio::time::Instant::now() + timeout;
        let connect = loop {
            match self.io.decoder.decode(&mut self.io.inbuf) {
                Ok(Some(Packet::Connect(c))) => {
                    // From here on the client's packets may be as large as the configuration allows.
                    self.io.decoder.max_packet_size = self.broker.config().mqtt.max_packet_size;
                    break c;
                }
                Ok(Some(_)) => return Err(Close::Refused("[MQTT-3.1.0-1] first packet is not CONNECT")),
                Ok(None) => {}
                Err(e) if e.kind == ErrorKind::UnacceptableProtocolVersion => {
                    // [MQTT-3.1.2-2] answered in the 3.1.1 format, which every client can read.
                    self.io.out.packet(&Packet::ConnAck(ConnAck {
                        session_present: false,
                        code: ReasonCode::V3_UNACCEPTABLE_PROTOCOL_VERSION,
                        properties: Properties::default(),
                    }));
                    return Err(Close::Refused(e.reason));
                }
                Err(e) => return Err(Close::Decode(e)),
            }
            match tokio::time::timeout_at(deadline, self.io.stream.read_buf(&mut self.io.inbuf)).await {
                Err(_) => return Err(Close::Refused("no CONNECT within the connect timeout")),
                Ok(Ok(0)) | Ok(Err(_)) => return Err(Close::SocketClosed),
                Ok(Ok(n)) => {
                    self.broker.metrics().hot.add(crate::metrics::Hot::BytesReceived, n as u64);
                }
            }
        };
        self.accept_connect(*connect).await
    }

    async fn accept_connect(&mut self, c: Connect) -> Accepted {
        let broker = self.broker.clone();
        let config = &broker.config().mqtt;
        let v5 = c.protocol.is_v5();
        self.io.out.version = c.protocol;
        let refuse = |out: &mut super::Outbound, code: ReasonCode| {
            out.packet(&Packet::ConnAck(ConnAck { session_present: false, code, properties: Properties::default() }));
        };
        if let Some(max) = c.properties.maximum_packet_size {
            self.io.out.max_packet_size = max as usize;
        }
        match broker.admit(self.peer.ip(), &self.client.limits) {
            Ok(counted) => self.client.counted_ip = counted,
            Err(refusal) => {
                use crate::broker::ConnectionRefusal::*;
                let code = match (v5, refusal) {
                    (false, _) => ReasonCode::V3_SERVER_UNAVAILABLE,
                    (true, ServerBusy) => ReasonCode::SERVER_BUSY,
                    (true, QuotaExceeded) => ReasonCode::QUOTA_EXCEEDED,
                    (true, RateExceeded) => ReasonCode::CONNECTION_RATE_EXCEEDED,
                };
                if crate::logging::connection_line() {
                    info!(peer = %self.peer, ?refusal, "connection refused by a limit");
                }
                refuse(&mut self.io.out, code);
                return Err(Close::Refused("connection limit"));
            }
        }
        if let Some(will) = &c.will {
            if crate::topic::levels(&will.topic) > config.max_topic_levels {
                if v5 {
                    refuse(&mut self.io.out, ReasonCode::TOPIC_NAME_INVALID);
                }
                return Err(Close::Refused("will topic has more levels than max_topic_levels"));
            }
        }
        if c.properties.authentication_method.is_some() {
            // Herald supports no enhanced authentication method [MQTT-4.12.0-1].
            refuse(&mut self.io.out, ReasonCode::BAD_AUTHENTICATION_METHOD);
            return Err(Close::Refused("unsupported authentication method"));
        }
        let mut assigned = None;
        let client_id = if c.client_id.is_empty() {
            let allowed = match c.protocol {
                ProtocolVersion::V3_1 => false,
                ProtocolVersion::V3_1_1 => c.clean_start,
                ProtocolVersion::V5 => true,
            };
            if !allowed {
                // [MQTT-3.1.3-8] a zero-byte client identifier needs a clean session in 3.1.1.
                let code =
                    if v5 { ReasonCode::CLIENT_IDENTIFIER_NOT_VALID } else { ReasonCode::V3_IDENTIFIER_REJECTED };
                refuse(&mut self.io.out, code);
                return Err(Close::Refused("[MQTT-3.1.3-8] empty client identifier without clean session"));
            }
            let id = assign_client_id(&broker);
            assigned = Some(id.clone());
            id
        } else {
            c.client_id.clone()
        };
        let session_expiry = if v5 {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            u32::MAX
        };
        let auth = broker.auth();
        let credentials = crate::auth::Credentials {
            client_id: client_id.clone(),
            username: c.username.clone(),
            password: c.password.clone(),
            certificate_name: self.certificate_name.take().map(String::from),
            peer: self.peer,
            protocol: match c.protocol {
                ProtocolVersion::V3_1 => "mqtt3",
                ProtocolVersion::V3_1_1 => "mqtt4",
                ProtocolVersion::V5 => "mqtt5",
            },
            loopback: self.loopback,
        };
        let (refusal, login) = match auth.login(credentials).await {
            crate::auth::Verdict::Allowed(login) => (None, login),
            crate::auth::Verdict::BadCredentials(why) => {
                let code =
                    if v5 { ReasonCode::BAD_USER_NAME_OR_PASSWORD } else { ReasonCode::V3_BAD_USER_NAME_OR_PASSWORD };
                (Some((why, code)), crate::auth::Login::anonymous())
            }
            crate::auth::Verdict::NotAuthorized(why) => {
                let code = if v5 { ReasonCode::NOT_AUTHORIZED } else { ReasonCode::V3_NOT_AUTHORIZED };
                (Some((why, code)), crate::auth::Login::anonymous())
            }
        };
        if let Some((why, code)) = refusal {
            broker.metrics().auth_failures.fetch_add(1, Ordering::Relaxed);
            if crate::logging::connection_line() {
                info!(client_id = client_id.as_str(), peer = %self.peer, reason = why.as_str(), "connection refused");
            }
            refuse(&mut self.io.out, code);
            return Err(Close::Refused("authentication failed"));
        }
        let username = login.user.clone();
        let owner = login.owner().to_owned();
        let not_owner = |out: &mut super::Outbound, session_owner: &str| {
            broker.owner_refused(&client_id, session_owner, &owner, self.peer);
            let code = if v5 { ReasonCode::NOT_AUTHORIZED } else { ReasonCode::V3_NOT_AUTHORIZED };
            refuse(out, code);
            Err(Close::Refused("the session belongs to another identity"))
        };
        if auth.session_owner {
            if let Some(session_owner) = broker.owned_elsewhere_by_other(&client_id, &owner) {
                return not_owner(&mut self.io.out, &session_owner);
            }
        }
        self.client.acl = auth.client_acl(&login, &client_id).map(Box::new);
        let mut server_keep_alive = None;
        let mut keep_alive = c.keep_alive;
        if v5 && config.max_keepalive > 0 && (keep_alive == 0 || keep_alive > config.max_keepalive) {
            keep_alive = config.max_keepalive;
            server_keep_alive = Some(keep_alive);
        }
        // A u32 of milliseconds rather than an Option<Duration>: 12 bytes less in every connection.
        self.client.keep_alive_ms = u32::from(keep_alive) * 1500;
        self.client.receive_window = usize::from(c.properties.receive_maximum.unwrap_or(if v5 {
            u16::MAX
        } else {
            config.max_inflight_messages
        }));
        self.io.out.topic_alias_maximum = c.properties.topic_alias_maximum.unwrap_or(0);
        self.client.session_expiry = session_expiry;
        self.client.will = c.will.map(Box::new);
        self.client.client_id = client_id.clone();

        let mut properties = Properties::default();
        if v5 {
            properties.assigned_client_identifier = assigned;
            properties.server_keep_alive = server_keep_alive;
            if config.topic_alias_maximum > 0 {
                properties.topic_alias_maximum = Some(config.topic_alias_maximum);
            }
            if config.receive_maximum != u16::MAX {
                properties.receive_maximum = Some(config.receive_maximum);
            }
            if (config.max_packet_size as usize) < crate::codec::wire::VARINT_MAX as usize + 5 {
                properties.maximum_packet_size = Some(config.max_packet_size);
            }
        }
        let mut connack = ConnAck { session_present: false, code: ReasonCode::SUCCESS, properties };
        if Packet::ConnAck(connack.clone()).encoded_len(self.io.out.version) > self.io.out.max_packet_size {
            // [MQTT-3.1.2-25] the CONNACK itself does not fit: all we can do is close, before
            // any session is taken.
            return Err(Close::Refused("CONNACK exceeds the client's maximum packet size"));
        }
        if session_expiry > 0 && broker.cluster().is_some_and(|l| !l.fence.may_deliver()) {
            // Fenced (`cluster::fence`): no persistent session here until the other nodes said
            // which ones they took over; the client tries again, here or elsewhere.
            let code = if v5 { ReasonCode::SERVER_UNAVAILABLE } else { ReasonCode::V3_SERVER_UNAVAILABLE };
            refuse(&mut self.io.out, code);
            return Err(Close::Refused("this node is fenced (out of touch with the cluster)"));
        }
        if !c.clean_start && broker.cluster().is_some() {
            // A session another node holds comes here first (docs/cluster.md).
            if let Err(why) = broker.adopt(&client_id).await {
                warn!(
                    client_id = client_id.as_str(),
                    reason = why.as_str(),
                    "the session held by another node could not be taken over"
                );
                let code = if v5 { ReasonCode::SERVER_UNAVAILABLE } else { ReasonCode::V3_SERVER_UNAVAILABLE };
                refuse(&mut self.io.out, code);
                return Err(Close::Refused("the session could not be taken over from another node"));
            }
        }
        let kick = self.kick_tx.take().ok_or(Close::Refused("CONNECT handled twice"))?;
        let claim = Claim {
            client_id: client_id.clone(),
            clean_start: c.clean_start,
            expiry_interval: session_expiry,
            will: self.client.will.as_deref().cloned(),
            conn_id: self.conn_id,
            kick,
            client: crate::session::ClientInfo::connecting(
                self.peer,
                c.protocol as u8,
                self.listener,
                username.clone(),
            ),
            owner: Some(owner.clone()),
            enforce_owner: auth.session_owner,
        };
        let claimed = match broker.registry().claim(claim).await {
            Ok(claimed) => claimed,
            Err(ClaimError::NotOwner { owner: session_owner }) => return not_owner(&mut self.io.out, &session_owner),
            Err(ClaimError::TakeoverTimeout) => {
                return Err(Close::Refused("the session's previous connection did not let go"))
            }
        };
        let (shared, session_present) = (claimed.shared.clone(), claimed.present);
        if let Some(link) = broker.cluster() {
            link.claimed(&client_id, c.clean_start);
            if session_expiry > 0 {
                let will = self.client.will.as_deref().cloned();
                link.record_connected(
                    &client_id,
                    session_expiry,
                    will,
                    &claimed.state.subscriptions,
                    claimed.shared.owner(),
                );
            }
        }
        let held = Held { shared: claimed.shared, state: claimed.state };

        // MQTT 3.1 has no session present flag: its CONNACK flags byte is reserved.
        connack.session_present = session_present && c.protocol != ProtocolVersion::V3_1;
        let connack = Packet::ConnAck(connack);
        if broker.has_priority_lanes() {
            // Made before any delivery can look for it, so no wake-up is missed.
            shared.urgent();
            let reserve = broker.config().delivery.high_priority_inflight;
            self.client.high_reserve = reserve.min(self.client.receive_window / 2).min(usize::from(u16::MAX)) as u16;
            self.client.lanes = true;
        }
        if v5 && c.properties.request_problem_information != Some(0) {
            let asked = c.properties.user_properties.iter().any(|(k, _)| k == crate::receipt::MSG_ID_PROPERTY);
            self.client.msg_id_on_ack = if asked { super::MsgIdOnAck::Always } else { super::MsgIdOnAck::OnRequest };
        }
        self.retry.enabled = !v5 && broker.config().delivery.retry_after > 0;
        broker.metrics().client_connected();
        broker.metrics().hot.add(crate::metrics::Hot::PacketsReceived, 1);
        self.io.out.packet(&connack);
        if crate::logging::connection_line() {
            // Client-supplied text goes in as a string field: quoted and escaped in text lines,
            // a JSON string in JSON lines, so a client identifier cannot forge a line.
            info!(
                client_id = self.client.client_id.as_str(),
                peer = %self.peer,
                protocol = c.protocol as u8,
                clean_start = c.clean_start,
                keep_alive,
                session_present,
                "client connected"
            );
        }
        Ok((held, session_present))
    }
}

/// A client identifier for a client that sent none: 128 bits from the operating system, so it
/// neither repeats after a restart nor can be guessed, and never one a known session holds (a
/// collision would hand the new client another reader's session).
fn assign_client_id(broker: &Broker) -> String {
    loop {
        let mut bits = [0u8; 16];
        getrandom::fill(&mut bits).expect("the operating system's random source");
        let id = format!("herald-{:032x}", u128::from_be_bytes(bits));
        if broker.registry().get(&id).is_none() {
            return id;
        }
    }
}
