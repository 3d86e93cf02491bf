//! `GET /api/v1/poll?filter=...&after=<cursor>&wait=<seconds>`: short and long polling, for
//! readers behind proxies that hold Server-Sent Events back. Every poller has a session: the
//! cursor (`next`) names it and the last message it got. A poll with `after` confirms what the
//! previous answer held (those leave the queue); an answer that never arrived is sent again,
//! since its messages were not confirmed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::reader::{Ask, Next, Reader};
use super::{Request, Response};
use crate::broker::Broker;

pub async fn poll(broker: &Arc<Broker>, req: Request, peer: SocketAddr) -> Response {
    let Some(cfg) = broker.config().http.as_ref().map(|h| h.readers.clone()) else {
        return Response::error(404, "no HTTP server");
    };
    let filters: Vec<String> = req.query.iter().filter(|(k, _)| k == "filter").map(|(_, v)| v.clone()).collect();
    let wait = match req.param("wait").map(str::parse::<u64>) {
        None => 0,
        Some(Ok(w)) => w.min(cfg.poll_max_wait_secs),
        Some(Err(_)) => return Response::error(400, "wait must be a whole number of seconds"),
    };
    let max = match req.param("max").map(str::parse::<usize>) {
        None => cfg.poll_max_messages,
        Some(Ok(n)) if n > 0 => n.min(cfg.poll_max_messages),
        Some(_) => return Response::error(400, "max must be a positive whole number"),
    };
    let named = req.param("client_id").map(str::to_owned);
    let (client_id, confirm) = match req.param("after") {
        Some(cursor) => {
            let Some((id, last)) = cursor.rsplit_once(':') else {
                return Response::error(400, "after must be a cursor from a previous answer's next");
            };
            if named.as_deref().is_some_and(|n| n != id) {
                return Response::error(400, "the cursor belongs to another client_id");
            }
            (Some(id.to_owned()), Some(last.to_owned()))
        }
        None => (named.clone(), None),
    };
    let ask = Ask {
        resume: client_id.is_some(),
        client_id,
        fresh_prefix: "herald-poll-",
        expiry_interval: if named.is_some() { cfg.session_expiry_secs } else { cfg.poll_session_expiry_secs },
        filters,
        protocol: crate::session::PROTOCOL_POLL,
        peer,
    };
    // In tasks of their own: a client hanging up during a long poll does not cancel it halfway
    // (the session is parked again when the wait ends). Opening (authentication, the session)
    // and waiting are two tasks: a task is as large as the largest state of its future, and the
    // opening's (an auth service's request among them) would stay allocated through a wait of
    // minutes.
    let b = broker.clone();
    let window = cfg.poll_max_messages;
    let opened = tokio::spawn(async move { Reader::open(&b, &req, ask).await });
    let mut reader = match opened.await {
        Ok(Ok(r)) => r,
        Ok(Err(refusal)) => return refusal,
        Err(_) => return Response::error(500, "the poll failed"),
    };
    let task = tokio::spawn(async move {
        reader.set_window(window);
        if let Some(id) = &confirm {
            reader.confirm(id);
        }
        let mut out = Vec::new();
        while out.len() < max {
            match reader.try_next() {
                Some(d) => out.push(d),
                None => break,
            }
        }
        if out.is_empty() && wait > 0 && !reader.is_kicked() {
            let until = tokio::time::Instant::now() + Duration::from_secs(wait);
            if let Next::Delivery(d) = reader.next(Some(until)).await {
                out.push(d);
                while out.len() < max {
                    match reader.try_next() {
                        Some(d) => out.push(d),
                        None => break,
                    }
                }
            }
        }
        let last = match out.last() {
            Some(d) => crate::receipt::message_id_text(d.message.id),
            None => confirm.unwrap_or_default(),
        };
        let mut body = Vec::with_capacity(256 + out.iter().map(|d| d.message.payload.len() + 200).sum::<usize>());
        body.extend_from_slice(b"{\"messages\":[");
        for (i, d) in out.iter().enumerate() {
            if i > 0 {
                body.push(b',');
            }
            body.extend_from_slice(&super::reader::event_json(&super::reader::event(d)));
        }
        body.extend_from_slice(b"],");
        let tail = serde_json::json!({
            "next": format!("{}:{last}", reader.client_id),
            "client_id": reader.client_id,
            "session_present": reader.present,
        });
        let tail = serde_json::to_vec(&tail).expect("JSON values serialize");
        // The object's fields after `messages`: its opening brace dropped.
        body.extend_from_slice(&tail[1..]);
        body.push(b'\n');
        for d in out {
            reader.written(d);
        }
        reader.close("poll answered");
        Response {
            status: 200,
            content_type: "application/json",
            body,
            extra_headers: vec![("cache-control", "no-store".to_owned())],
        }
    });
    task.await.unwrap_or_else(|_| Response::error(500, "the poll failed"))
}
