//! The receipts' tasks: the flusher that writes changed receipts to the store once a second and
//! forgets expired ones, and the reports sent on publishers' response topics.

use std::sync::Arc;
use std::time::Instant;

use crate::receipt::{message_id_text, MSG_ID_PROPERTY};

/// Writes the receipts that changed to the store and removes those past the retention.
pub fn flush(broker: &crate::broker::Broker) {
    let (changed, expired) = broker.receipts().take_changes();
    if changed.is_empty() && expired.is_empty() {
        return;
    }
    let mut txn = crate::store::Txn::default();
    for r in &changed {
        txn.put_receipt(r.id, r.encode());
    }
    for id in expired {
        txn.remove_receipt(id);
    }
    broker.store().commit(txn);
}

/// Once a second: writes the receipts that changed to the store and removes those past the
/// retention, and publishes the receipts asked for on a response topic once their deliveries
/// are settled (or `report_after` has passed).
pub async fn maintain(broker: Arc<crate::broker::Broker>) {
    let mut ticker = tokio::time::interval(std::time::Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let b = broker.clone();
        let flushed = tokio::task::spawn_blocking(move || flush(&b)).await;
        if flushed.is_err() {
            tracing::error!("writing receipts failed");
        }
        for r in broker.receipts().due_reports(Instant::now()) {
            let Some(to) = &r.report_to else { continue };
            let body = serde_json::to_vec(&r.to_json()).expect("JSON values serialize");
            let mut m = crate::message::Message::new(
                to.response_topic.clone(),
                body.into(),
                crate::codec::QoS::AtLeastOnce,
                false,
            );
            m.properties.correlation_data = to.correlation_data.clone();
            m.properties.content_type = Some("application/json".into());
            m.properties.user_properties.push((MSG_ID_PROPERTY.into(), message_id_text(r.id)));
            broker.publish(Arc::new(m));
        }
    }
}
