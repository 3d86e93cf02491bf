//! The durable state, in RocksDB under `[storage] path`: retained messages and persistent
//! sessions (their record, subscriptions, queue of message references, in-flight state and
//! incoming QoS 2 identifiers), with message bodies stored once. docs/storage.md gives the
//! column families, the key layout and what each durability mode can lose.
//!
//! Nothing on the hot path waits for the disk. Callers describe their writes in a `Txn` and
//! `commit` it: that appends to the batch being gathered, under a lock held only for the append,
//! and returns a ticket. One writer thread writes each gathered batch with one WAL write (and,
//! in `sync` mode, one fsync) and then announces the ticket as committed. A connection holds
//! back the acknowledgement of a PUBLISH or SUBSCRIBE until its ticket is committed, so many
//! clients' messages share each fsync (group commit).

pub mod records;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use rustc_hash::FxHashMap;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::codec::SubscriptionOptions;
use crate::config::Durability;
use crate::message::Message;
use records::{QueueEntry, SessionRecord};

/// Bodies read back from the store and still alive somewhere, by message id.
#[derive(Default)]
struct LoadedBodies {
    by_id: FxHashMap<u64, std::sync::Weak<Message>>,
    /// Dead entries are swept when the map reaches this size, so sweeping stays amortised.
    sweep_at: usize,
}

impl LoadedBodies {
    fn get(&self, id: &u64) -> Option<&std::sync::Weak<Message>> {
        self.by_id.get(id)
    }

    fn insert_all(&mut self, bodies: Vec<(u64, std::sync::Weak<Message>)>) {
        if self.by_id.len() + bodies.len() >= self.sweep_at {
            self.by_id.retain(|_, w| w.strong_count() > 0);
            self.sweep_at = (2 * (self.by_id.len() + bodies.len())).max(1024);
        }
        self.by_id.extend(bodies);
    }
}

/// Column families, one per kind of record.
pub const CF_META: &str = "meta";
pub const CF_RETAINED: &str = "retained";
pub const CF_MESSAGES: &str = "messages";
pub const CF_SESSIONS: &str = "sessions";
pub const CF_SUBSCRIPTIONS: &str = "subscriptions";
pub const CF_QUEUE: &str = "queue";
pub const CF_INCOMING: &str = "incoming_qos2";
pub const CF_RECEIPTS: &str = "receipts";
const FAMILIES: [&str; 8] =
    [CF_META, CF_RETAINED, CF_MESSAGES, CF_SESSIONS, CF_SUBSCRIPTIONS, CF_QUEUE, CF_INCOMING, CF_RECEIPTS];
const FORMAT_KEY: &[u8] = b"format";
const FORMAT: &[u8] = b"herald-store-1";
/// How many times a broker has opened this store: the high bits of every message id.
const BOOT_KEY: &[u8] = b"boot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}: {source}")]
    Open { path: PathBuf, source: rocksdb::Error },
    #[error("the store at {path} is unreadable: {why}; refusing to start with an empty store (move it aside to start afresh)")]
    Corrupt { path: PathBuf, why: String },
    /// A batch could not be written. Nothing after it is acknowledged; the server stops and
    /// `main` exits with `EXIT_WRITE_FAILED`.
    #[error("writing to the store at {path} failed: {why}")]
    Write { path: PathBuf, why: String },
}

/// The process exit status after a store write failed (EX_IOERR of sysexits.h).
pub const EXIT_WRITE_FAILED: u8 = 74;

pub use crate::message::QueueRef;

/// What a restart finds: the retained messages and the persistent sessions that have not
/// expired, with everything that refers to something missing or expired already removed.
#[derive(Default)]
pub struct Recovered {
    pub retained: Vec<Message>,
    pub sessions: Vec<RecoveredSession>,
    pub queued: usize,
    pub removed_expired_sessions: usize,
    pub removed_expired_messages: usize,
    /// Delivery receipts as stored (`receipts::Receipt::encode`).
    pub receipts: Vec<Vec<u8>>,
}

pub struct RecoveredSession {
    pub client_id: String,
    pub record: SessionRecord,
    pub subscriptions: Vec<(String, SubscriptionOptions, Option<u32>)>,
    /// Its queue as the store holds it, counted but not read: `Store::load_queue` reads it when
    /// the session is needed.
    pub cold: ColdQueue,
    pub incoming_qos2: Vec<u16>,
}

/// A restored session's queue left in the store: how many entries (queued or in flight) and
/// how many payload bytes, for the queue's bounds and the figures, until it is read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColdQueue {
    pub messages: usize,
    pub bytes: usize,
}

/// A queue entry read back from the store, with its body.
pub type LoadedEntry = (QueueRef, QueueEntry, Arc<Message>);

enum Write {
    Put(&'static str, Vec<u8>, Vec<u8>),
    Delete(&'static str, Vec<u8>),
    DeleteRange(&'static str, Vec<u8>, Vec<u8>),
    /// One more queue entry refers to this body.
    Ref(u64),
    /// One fewer; the body goes with the last.
    Unref(u64),
}

/// Writes described by one caller and committed together.
#[derive(Default)]
pub struct Txn {
    writes: Vec<Write>,
}

impl Txn {
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    pub fn put_message(&mut self, id: u64, message: &Message) {
        self.writes.push(Write::Put(CF_MESSAGES, records::seq_key(id).to_vec(), records::encode_message(message)));
    }

    pub fn enqueue(&mut self, client_id: &str, at: QueueRef, entry: &QueueEntry) {
        self.writes.push(Write::Ref(at.message_id));
        self.writes.push(Write::Put(CF_QUEUE, records::queue_key(client_id, at.seq), records::encode_entry(entry)));
    }

    /// Records a queued message's packet identifier and QoS state once it is sent.
    pub fn update_entry(&mut self, client_id: &str, at: QueueRef, entry: &QueueEntry) {
        self.writes.push(Write::Put(CF_QUEUE, records::queue_key(client_id, at.seq), records::encode_entry(entry)));
    }

    pub fn remove_entry(&mut self, client_id: &str, at: QueueRef) {
        self.writes.push(Write::Delete(CF_QUEUE, records::queue_key(client_id, at.seq)));
        self.writes.push(Write::Unref(at.message_id));
    }

    pub fn put_session(&mut self, client_id: &str, record: &SessionRecord) {
        self.writes.push(Write::Put(CF_SESSIONS, client_id.as_bytes().to_vec(), records::encode_session(record)));
    }

    /// Removes a session with everything it owns; `held` are the queue references its state
    /// still held in memory, whose bodies may now go.
    pub fn remove_session(&mut self, client_id: &str, held: impl IntoIterator<Item = QueueRef>) {
        self.writes.push(Write::Delete(CF_SESSIONS, client_id.as_bytes().to_vec()));
        for cf in [CF_SUBSCRIPTIONS, CF_QUEUE, CF_INCOMING] {
            self.writes.push(Write::DeleteRange(
                cf,
                records::session_prefix(client_id),
                records::session_range_end(client_id),
            ));
        }
        self.writes.extend(held.into_iter().map(|r| Write::Unref(r.message_id)));
    }

    pub fn put_subscription(&mut self, client_id: &str, filter: &str, options: &SubscriptionOptions, id: Option<u32>) {
        self.writes.push(Write::Put(
            CF_SUBSCRIPTIONS,
            records::subscription_key(client_id, filter),
            records::encode_subscription(options, id),
        ));
    }

    pub fn remove_subscription(&mut self, client_id: &str, filter: &str) {
        self.writes.push(Write::Delete(CF_SUBSCRIPTIONS, records::subscription_key(client_id, filter)));
    }

    pub fn put_incoming(&mut self, client_id: &str, packet_id: u16) {
        self.writes.push(Write::Put(CF_INCOMING, records::incoming_key(client_id, packet_id), Vec::new()));
    }

    pub fn remove_incoming(&mut self, client_id: &str, packet_id: u16) {
        self.writes.push(Write::Delete(CF_INCOMING, records::incoming_key(client_id, packet_id)));
    }

    /// Stores a retained message, or removes the topic's when the payload is empty [MQTT-3.3.1-6].
    pub fn set_retained(&mut self, message: &Message) {
        if message.payload.is_empty() {
            self.writes.push(Write::Delete(CF_RETAINED, message.topic.as_bytes().to_vec()));
        } else {
            self.writes.push(Write::Put(
                CF_RETAINED,
                message.topic.as_bytes().to_vec(),
                records::encode_message(message),
            ));
        }
    }

    pub fn put_receipt(&mut self, id: u64, value: Vec<u8>) {
        self.writes.push(Write::Put(CF_RECEIPTS, records::seq_key(id).to_vec(), value));
    }

    pub fn remove_receipt(&mut self, id: u64) {
        self.writes.push(Write::Delete(CF_RECEIPTS, records::seq_key(id).to_vec()));
    }

    pub fn remove_retained(&mut self, topic: &str) {
        self.writes.push(Write::Delete(CF_RETAINED, topic.as_bytes().to_vec()));
    }
}

/// The batch being gathered for the writer.
struct Gathering {
    batch: WriteBatch,
    /// The ticket of `batch`: committed once the writer has written it.
    ticket: u64,
    /// Queue entries per stored body.
    refs: HashMap<u64, u32>,
    closing: bool,
}

struct Shared {
    db: DB,
    gathering: Mutex<Gathering>,
    wake: Condvar,
    committed: watch::Sender<u64>,
    /// Set once, by the writer, when a batch write fails; the writer then stops.
    failed: watch::Sender<Option<String>>,
    durability: Durability,
    batches: AtomicU64,
    writes: AtomicU64,
    write_nanos: AtomicU64,
    /// Time per batch write (with its fsync in `sync` mode), for /metrics.
    commit_latency: crate::metrics::Histogram<{ crate::metrics::COMMIT_BUCKETS }>,
}

pub struct Store {
    shared: Arc<Shared>,
    next_seq: AtomicU64,
    /// Every queue entry written before this start has a lower number: what a restored
    /// session's cold queue is (`load_queue`).
    cold_below: u64,
    /// Bodies read back by `load_queue`, so that sessions that share a message share one copy.
    loaded: Mutex<LoadedBodies>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    path: PathBuf,
    boot: u64,
}

/// Figures for logs and, later, metrics.
#[derive(Debug, Clone, Copy)]
pub struct StoreStats {
    pub batches: u64,
    pub writes: u64,
    pub write_nanos: u64,
    pub stored_messages: usize,
}

impl Store {
    /// Opens (or creates) the store and reads back what it holds. Anything RocksDB reports as
    /// unreadable stops the broker: starting empty would silently lose every queued story.
    /// `block_cache_bytes`: the one cache of table blocks every column family shares.
    pub fn open(
        path: &Path,
        durability: Durability,
        block_cache_bytes: usize,
    ) -> Result<(Store, Recovered), StoreError> {
        let started = Instant::now();
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_paranoid_checks(true);
        opts.set_compression_type(rocksdb::DBCompressionType::Lz4);
        opts.set_max_background_jobs(2);
        // Smaller memtables and a bounded WAL keep the log replayed after a crash short: with
        // the defaults (64 MB per family) a start after SIGKILL with 1M queued messages replayed
        // 76 MB of log.
        opts.set_write_buffer_size(16 << 20);
        opts.set_max_total_wal_size(32 << 20);
        // One block cache of a configured size for every family: without one, RocksDB makes a
        // 32 MB cache of its own, and reading back a million queued messages fills it
        // (resident memory that stays after the queues are gone).
        let mut tables = rocksdb::BlockBasedOptions::default();
        tables.set_block_cache(&rocksdb::Cache::new_lru_cache(block_cache_bytes.max(1 << 20)));
        opts.set_block_based_table_factory(&tables);
        let existed = path.join("CURRENT").exists();
        let families = FAMILIES.iter().map(|name| ColumnFamilyDescriptor::new(*name, opts.clone()));
        let db = DB::open_cf_descriptors(&opts, path, families).map_err(|source| {
            if source.kind() == rocksdb::ErrorKind::Corruption {
                StoreError::Corrupt { path: path.into(), why: source.to_string() }
            } else {
                StoreError::Open { path: path.into(), source }
            }
        })?;
        let corrupt = |why: String| StoreError::Corrupt { path: path.into(), why };
        let meta = db.cf_handle(CF_META).expect("column family opened");
        match db.get_cf(meta, FORMAT_KEY).map_err(|e| corrupt(e.to_string()))? {
            Some(f) if f == FORMAT => {}
            Some(f) => return Err(corrupt(format!("store format {:?}, this build reads {:?}", f, FORMAT))),
            None if existed && has_any_record(&db) => {
                return Err(corrupt("records present but no format marker".into()));
            }
            None => db.put_cf(meta, FORMAT_KEY, FORMAT).map_err(|e| corrupt(e.to_string()))?,
        }
        let boot = match db.get_cf(meta, BOOT_KEY).map_err(|e| corrupt(e.to_string()))? {
            Some(b) => u64::from_be_bytes(b.as_slice().try_into().map_err(|_| corrupt("boot counter".into()))?) + 1,
            None => 1,
        };
        db.put_cf(meta, BOOT_KEY, boot.to_be_bytes()).map_err(|e| corrupt(e.to_string()))?;
        let (recovered, refs, max_seq) = recover(&db).map_err(corrupt)?;
        info!(
            path = %path.display(),
            sessions = recovered.sessions.len(),
            queued = recovered.queued,
            retained = recovered.retained.len(),
            expired_sessions = recovered.removed_expired_sessions,
            expired_messages = recovered.removed_expired_messages,
            ms = started.elapsed().as_millis() as u64,
            "store opened"
        );
        let (committed, _) = watch::channel(0);
        let (failed, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            db,
            gathering: Mutex::new(Gathering { batch: WriteBatch::default(), ticket: 1, refs, closing: false }),
            wake: Condvar::new(),
            committed,
            failed,
            durability,
            batches: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            write_nanos: AtomicU64::new(0),
            commit_latency: Default::default(),
        });
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("herald-store".into())
            .spawn(move || write_batches(&writer_shared))
            .expect("spawn the store writer thread");
        let store = Store {
            shared,
            next_seq: AtomicU64::new(max_seq + 1),
            cold_below: max_seq + 1,
            loaded: Mutex::default(),
            writer: Mutex::new(Some(writer)),
            path: path.into(),
            boot,
        };
        Ok((store, recovered))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How many times the store has been opened, this time included: message ids carry it so
    /// that they stay unique across restarts.
    pub fn boot(&self) -> u64 {
        self.boot
    }

    /// The store's batch write latencies (fsync included in `sync` mode), in microseconds.
    pub fn commit_latency(&self) -> crate::metrics::HistogramReading {
        self.shared.commit_latency.read()
    }

    /// Bytes of the store's files on disk (tables, logs, manifests).
    pub fn disk_bytes(&self) -> u64 {
        let Ok(dir) = std::fs::read_dir(&self.path) else { return 0 };
        dir.filter_map(|e| e.ok()?.metadata().ok()).filter(|m| m.is_file()).map(|m| m.len()).sum()
    }

    /// A fresh number for a message body or a queue entry; numbers are never reused.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The number `next_seq` hands out next.
    pub fn peek_next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }

    /// The oldest message body some queue entry still refers to (cluster mode's checkpoint,
    /// once a second: a scan of the reference counts under the store's lock, about a
    /// millisecond per 500,000 live bodies).
    pub fn oldest_body(&self) -> Option<u64> {
        self.shared.gathering.lock().expect("store lock").refs.keys().min().copied()
    }

    /// Appends the writes to the batch being gathered and returns its ticket (0 for nothing).
    /// Writes are applied in commit order.
    pub fn commit(&self, txn: Txn) -> u64 {
        if txn.writes.is_empty() {
            return 0;
        }
        let shared = &*self.shared;
        let db = &shared.db;
        let cf = |name: &str| db.cf_handle(name).expect("column family opened");
        let mut g = shared.gathering.lock().expect("store lock");
        for w in txn.writes {
            match w {
                Write::Put(family, k, v) => g.batch.put_cf(cf(family), k, v),
                Write::Delete(family, k) => g.batch.delete_cf(cf(family), k),
                Write::DeleteRange(family, from, to) => g.batch.delete_range_cf(cf(family), from, to),
                Write::Ref(id) => *g.refs.entry(id).or_insert(0) += 1,
                Write::Unref(id) => {
                    if let Some(n) = g.refs.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            g.refs.remove(&id);
                            g.batch.delete_cf(cf(CF_MESSAGES), records::seq_key(id));
                        }
                    }
                }
            }
        }
        if g.batch.is_empty() {
            // Only reference counts changed: nothing for the writer, nothing to wait for.
            return 0;
        }
        let ticket = g.ticket;
        drop(g);
        shared.wake.notify_one();
        ticket
    }

    /// Reads a restored session's queue as the store held it at start, in queue order, with the
    /// bodies (shared with other sessions that loaded the same message). Entries whose body is
    /// gone are skipped. Reads the disk: for a session coming back, never for routing a message
    /// (except when a full cold queue's policy must choose what to drop).
    pub fn load_queue(&self, client_id: &str, prepare: &dyn Fn(&Message)) -> Result<Vec<LoadedEntry>, StoreError> {
        let db = &self.shared.db;
        let corrupt = |why: String| StoreError::Corrupt { path: self.path.clone(), why };
        let mut entries = Vec::new();
        self.cold_range(client_id, |k, v| {
            let (_, suffix) = records::split_prefix(k)?;
            entries.push((records::seq_of(suffix)?, records::decode_entry(v)?));
            Ok(())
        })?;
        // Bodies another session loaded already are shared; the others are read and decoded
        // once per load, then offered to later loads. The map's lock is taken twice per load,
        // not per entry.
        let mut bodies: FxHashMap<u64, Option<Arc<Message>>> = FxHashMap::default();
        {
            let loaded = self.loaded.lock().expect("loaded bodies lock");
            for (_, e) in &entries {
                bodies.entry(e.message_id).or_insert_with(|| loaded.get(&e.message_id).and_then(|w| w.upgrade()));
            }
        }
        let missing: Vec<u64> = bodies.iter().filter(|(_, b)| b.is_none()).map(|(id, _)| *id).collect();
        if !missing.is_empty() {
            let messages = db.cf_handle(CF_MESSAGES).expect("column family opened");
            let keys = missing.iter().map(|id| (&messages, records::seq_key(*id)));
            let mut fresh = Vec::with_capacity(missing.len());
            for (id, got) in missing.iter().zip(db.multi_get_cf(keys)) {
                let Some(bytes) = got.map_err(|e| corrupt(e.to_string()))? else {
                    warn!(client_id, message_id = id, "a queued message's body is missing; its entries are skipped");
                    continue;
                };
                let message = records::decode_message(&bytes).map_err(|e| corrupt(e.to_string()))?;
                let _ = message.store_id.set(*id);
                prepare(&message);
                let body = Arc::new(message);
                fresh.push((*id, Arc::downgrade(&body)));
                bodies.insert(*id, Some(body));
            }
            self.loaded.lock().expect("loaded bodies lock").insert_all(fresh);
        }
        let out = entries
            .into_iter()
            .filter_map(|(seq, entry)| {
                let body = bodies.get(&entry.message_id)?.clone()?;
                Some((QueueRef { seq, message_id: entry.message_id }, entry, body))
            })
            .collect();
        Ok(out)
    }

    /// The references of a restored session's cold queue, without reading the bodies: what
    /// ending a session that never came back must release.
    pub fn cold_refs(&self, client_id: &str) -> Result<Vec<QueueRef>, StoreError> {
        let mut out = Vec::new();
        self.cold_range(client_id, |k, v| {
            let (_, suffix) = records::split_prefix(k)?;
            out.push(QueueRef { seq: records::seq_of(suffix)?, message_id: records::entry_message_id(v)? });
            Ok(())
        })?;
        Ok(out)
    }

    /// Calls `f` on each entry of `client_id`'s queue written before this start, in order.
    fn cold_range(
        &self,
        client_id: &str,
        mut f: impl FnMut(&[u8], &[u8]) -> Result<(), records::RecordError>,
    ) -> Result<(), StoreError> {
        let corrupt = |why: String| StoreError::Corrupt { path: self.path.clone(), why };
        let db = &self.shared.db;
        let mut options = rocksdb::ReadOptions::default();
        options.set_iterate_upper_bound(records::queue_key(client_id, self.cold_below));
        let mut it = db.raw_iterator_cf_opt(db.cf_handle(CF_QUEUE).expect("column family opened"), options);
        it.seek(records::queue_key(client_id, 0));
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            f(k, v).map_err(|e| corrupt(e.to_string()))?;
            it.next();
        }
        it.status().map_err(|e| corrupt(e.to_string()))
    }

    /// Follows the committed ticket.
    pub fn committed(&self) -> watch::Receiver<u64> {
        self.shared.committed.subscribe()
    }

    /// Resolves when a batch write has failed, with the error: the server then stops (acknowledgements
    /// waiting for that batch are never sent).
    pub async fn write_failure(&self) -> StoreError {
        let mut rx = self.shared.failed.subscribe();
        let why = rx.wait_for(|f| f.is_some()).await.ok().and_then(|f| f.clone());
        let Some(why) = why else {
            // The sender lives as long as the store; a closed channel means it is being dropped.
            return std::future::pending().await;
        };
        StoreError::Write { path: self.path.clone(), why }
    }

    pub fn is_committed(&self, ticket: u64) -> bool {
        *self.shared.committed.borrow() >= ticket
    }

    pub fn stats(&self) -> StoreStats {
        let s = &self.shared;
        StoreStats {
            batches: s.batches.load(Ordering::Relaxed),
            writes: s.writes.load(Ordering::Relaxed),
            write_nanos: s.write_nanos.load(Ordering::Relaxed),
            stored_messages: s.gathering.lock().expect("store lock").refs.len(),
        }
    }

    /// Writes what is gathered and stops the writer; later commits are not written.
    pub fn close(&self) {
        self.shared.gathering.lock().expect("store lock").closing = true;
        self.shared.wake.notify_one();
        let Some(writer) = self.writer.lock().expect("writer lock").take() else {
            return; // closed already
        };
        let _ = writer.join();
        let stats = self.stats();
        if stats.batches > 0 {
            info!(
                batches = stats.batches,
                writes = stats.writes,
                writes_per_batch = stats.writes / stats.batches,
                mean_write_us = stats.write_nanos / stats.batches / 1000,
                "store writer stopped"
            );
        }
        if let Err(e) = self.shared.db.flush_wal(true) {
            warn!(error = %e, "flushing the store's WAL at shutdown failed");
        }
        // Memtables to table files now, so that the next start reads tables instead of
        // replaying the whole write-ahead log (measured: 1.9 s instead of 0.4 s with 1M queued).
        for name in FAMILIES {
            let cf = self.shared.db.cf_handle(name).expect("column family opened");
            if let Err(e) = self.shared.db.flush_cf(cf) {
                warn!(error = %e, family = name, "flushing the store at shutdown failed");
            }
        }
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_batches(shared: &Shared) {
    let mut options = WriteOptions::default();
    options.set_sync(shared.durability == Durability::Sync);
    loop {
        let (batch, ticket, closing) = {
            let mut g = shared.gathering.lock().expect("store lock");
            while g.batch.is_empty() && !g.closing {
                g = shared.wake.wait(g).expect("store lock");
            }
            let ticket = g.ticket;
            g.ticket += 1;
            (std::mem::take(&mut g.batch), ticket, g.closing)
        };
        if !batch.is_empty() {
            let n = batch.len() as u64;
            let started = Instant::now();
            if let Err(e) = shared.db.write_opt(batch, &options) {
                // Acknowledgements wait on this write; carrying on would break the promise they
                // make. The writer stops without moving the committed ticket, so none of them is
                // sent, and the server hears of it and stops: publishers resend to a broker that
                // can keep the promise.
                error!(error = %e, "writing to the store failed; stopping");
                shared.failed.send_replace(Some(e.to_string()));
                return;
            }
            let nanos = started.elapsed().as_nanos() as u64;
            shared.write_nanos.fetch_add(nanos, Ordering::Relaxed);
            shared.commit_latency.observe(nanos / 1000);
            shared.batches.fetch_add(1, Ordering::Relaxed);
            shared.writes.fetch_add(n, Ordering::Relaxed);
        }
        shared.committed.send_replace(ticket);
        if closing {
            return;
        }
    }
}

fn has_any_record(db: &DB) -> bool {
    FAMILIES[1..].iter().any(|name| {
        let cf = db.cf_handle(name).expect("column family opened");
        db.iterator_cf(cf, IteratorMode::Start).next().is_some()
    })
}

type Scan = (Recovered, HashMap<u64, u32>, u64);

/// Reads every column family once, in key order, and removes what has expired or refers to
/// nothing. Returns what was recovered, the references per body and the highest number used.
fn recover(db: &DB) -> Result<Scan, String> {
    let now_ms = crate::clock::wall_ms_now();
    let now = Instant::now();
    let cf = |name: &str| db.cf_handle(name).expect("column family opened");
    let mut cleanup = WriteBatch::default();
    let mut out = Recovered::default();
    let mut max_seq = 0u64;

    let mut sessions: HashMap<String, RecoveredSession> = HashMap::new();
    for item in db.iterator_cf(cf(CF_SESSIONS), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let client_id = String::from_utf8(k.to_vec()).map_err(|e| format!("session key: {e}"))?;
        let record = records::decode_session(&v).map_err(|e| e.to_string())?;
        let expired = record.disconnected_at_ms != 0
            && record.expiry_interval != u32::MAX
            && now_ms >= record.disconnected_at_ms + u64::from(record.expiry_interval) * 1000;
        if expired {
            out.removed_expired_sessions += 1;
            cleanup.delete_cf(cf(CF_SESSIONS), &k);
            continue;
        }
        sessions.insert(
            client_id.clone(),
            RecoveredSession {
                client_id,
                record,
                subscriptions: Vec::new(),
                cold: ColdQueue::default(),
                incoming_qos2: Vec::new(),
            },
        );
    }

    for item in db.iterator_cf(cf(CF_SUBSCRIPTIONS), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let (client_id, filter) = records::split_session_key(&k).map_err(|e| e.to_string())?;
        match sessions.get_mut(&client_id) {
            Some(s) => {
                let filter = String::from_utf8(filter.to_vec()).map_err(|e| format!("subscription key: {e}"))?;
                let (options, id) = records::decode_subscription(&v).map_err(|e| e.to_string())?;
                s.subscriptions.push((filter, options, id));
            }
            None => cleanup.delete_cf(cf(CF_SUBSCRIPTIONS), &k),
        }
    }

    for item in db.iterator_cf(cf(CF_INCOMING), IteratorMode::Start) {
        let (k, _) = item.map_err(|e| e.to_string())?;
        let (client_id, suffix) = records::split_session_key(&k).map_err(|e| e.to_string())?;
        match (sessions.get_mut(&client_id), <[u8; 2]>::try_from(suffix)) {
            (Some(s), Ok(id)) => s.incoming_qos2.push(u16::from_be_bytes(id)),
            _ => cleanup.delete_cf(cf(CF_INCOMING), &k),
        }
    }

    // Bodies first, summarised without decoding them: whether each has expired and what its
    // payload weighs. Queue entries are then counted, not decoded or kept (issue 14: a parked
    // session's queue is read when the session comes back), so a start with a million queued
    // messages allocates nothing per entry.
    let mut bodies: FxHashMap<u64, records::MessageSummary> = FxHashMap::default();
    scan(db, CF_MESSAGES, |k, v| {
        let id = records::seq_of(k).map_err(|e| e.to_string())?;
        max_seq = max_seq.max(id);
        let summary = records::message_summary(v).map_err(|e| e.to_string())?;
        if summary.is_expired(now_ms) {
            out.removed_expired_messages += 1;
            cleanup.delete_cf(cf(CF_MESSAGES), k);
        } else {
            bodies.insert(id, summary);
        }
        Ok(())
    })?;

    let mut refs: FxHashMap<u64, u32> = FxHashMap::default();
    refs.reserve(bodies.len());
    // Entries are in key order, so one session's are together: its name is read and looked up
    // once, and its counts gathered here until the next session's entries begin.
    let mut group_prefix: Vec<u8> = Vec::new();
    let mut group: Option<(String, ColdQueue)> = None;
    let flush = |sessions: &mut HashMap<String, RecoveredSession>, group: &mut Option<(String, ColdQueue)>| {
        if let Some((client_id, cold)) = group.take() {
            sessions.get_mut(&client_id).expect("looked up").cold = cold;
        }
    };
    scan(db, CF_QUEUE, |k, v| {
        let (prefix, suffix) = records::split_prefix(k).map_err(|e| e.to_string())?;
        let seq = records::seq_of(suffix).map_err(|e| e.to_string())?;
        max_seq = max_seq.max(seq);
        if group_prefix != prefix {
            flush(&mut sessions, &mut group);
            group_prefix.clear();
            group_prefix.extend_from_slice(prefix);
            let (client_id, _) = records::split_session_key(k).map_err(|e| e.to_string())?;
            if sessions.contains_key(&client_id) {
                group = Some((client_id, ColdQueue::default()));
            }
        }
        let Some((_, cold)) = group.as_mut() else {
            cleanup.delete_cf(cf(CF_QUEUE), k);
            return Ok(());
        };
        let id = records::entry_message_id(v).map_err(|e| e.to_string())?;
        match bodies.get(&id) {
            Some(body) => {
                *refs.entry(id).or_insert(0) += 1;
                cold.messages += 1;
                cold.bytes += body.payload_len;
                out.queued += 1;
            }
            // Its body expired (or is missing): the entry goes too, never delivered.
            None => cleanup.delete_cf(cf(CF_QUEUE), k),
        }
        Ok(())
    })?;
    flush(&mut sessions, &mut group);
    for id in bodies.keys().filter(|id| !refs.contains_key(id)) {
        cleanup.delete_cf(cf(CF_MESSAGES), records::seq_key(*id));
    }

    for item in db.iterator_cf(cf(CF_RETAINED), IteratorMode::Start) {
        let (k, v) = item.map_err(|e| e.to_string())?;
        let message = records::decode_message(&v).map_err(|e| e.to_string())?;
        if message.is_expired(now) {
            cleanup.delete_cf(cf(CF_RETAINED), &k);
            continue;
        }
        out.retained.push(message);
    }

    for item in db.iterator_cf(cf(CF_RECEIPTS), IteratorMode::Start) {
        let (_, v) = item.map_err(|e| e.to_string())?;
        out.receipts.push(v.to_vec());
    }

    // Sessions that expired while the broker was down go with everything they owned.
    let expired: Vec<String> = {
        let mut names = Vec::new();
        for item in db.iterator_cf(cf(CF_SESSIONS), IteratorMode::Start) {
            let (k, _) = item.map_err(|e| e.to_string())?;
            let id = String::from_utf8_lossy(&k).into_owned();
            if !sessions.contains_key(&id) {
                names.push(id);
            }
        }
        names
    };
    for id in expired {
        for family in [CF_SUBSCRIPTIONS, CF_QUEUE, CF_INCOMING] {
            cleanup.delete_range_cf(cf(family), records::session_prefix(&id), records::session_range_end(&id));
        }
    }

    if !cleanup.is_empty() {
        let mut options = WriteOptions::default();
        options.set_sync(true);
        db.write_opt(cleanup, &options).map_err(|e| e.to_string())?;
    }
    out.sessions = sessions.into_values().collect();
    Ok((out, refs.into_iter().collect(), max_seq))
}

/// Calls `f` on every record of a column family in key order, without an allocation per
/// record and without filling the block cache with what is read once.
fn scan(db: &DB, family: &str, mut f: impl FnMut(&[u8], &[u8]) -> Result<(), String>) -> Result<(), String> {
    let mut options = rocksdb::ReadOptions::default();
    options.fill_cache(false);
    options.set_readahead_size(2 << 20);
    let mut it = db.raw_iterator_cf_opt(db.cf_handle(family).expect("column family opened"), options);
    it.seek_to_first();
    while let (Some(k), Some(v)) = (it.key(), it.value()) {
        f(k, v)?;
        it.next();
    }
    it.status().map_err(|e| e.to_string())
}
