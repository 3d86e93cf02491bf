//! A session's mailbox: the bounded queue the router fills and the session's connection drains.
//!
//! One small allocation per session, inside `SessionShared`'s: a queue that allocates with its
//! first message and is freed when drained after a burst or before the connection hibernates.
//! tokio's channel, which it replaces, allocated its first block of 32 slots and two cache-padded
//! halves with every session: 1.8 KB for each idle phone (bench/notes.md, issue 14).

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Mutex;
use std::task::{Context, Poll};

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

/// Capacity a drained queue may keep; above it the queue's memory is freed.
const KEEP_CAPACITY: usize = 32;

struct Shared<T> {
    queue: Mutex<Queue<T>>,
    capacity: usize,
    /// The receiving connection's task, woken when a message arrives.
    receiver: AtomicWaker,
    /// Publishers waiting for room: woken when a full mailbox has room again.
    room: Notify,
}

struct Queue<T> {
    items: VecDeque<T>,
    /// Slots promised to publishers that waited for room (`reserve`).
    reserved: usize,
    /// The receiver is gone.
    closed: bool,
}

#[derive(Debug)]
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

#[derive(Debug)]
pub struct Closed;

pub struct Sender<T>(std::sync::Arc<Shared<T>>);

pub struct Receiver<T>(std::sync::Arc<Shared<T>>);

/// A slot reserved in a mailbox; sending into it cannot fail.
pub struct Permit<'a, T> {
    shared: &'a Shared<T>,
    used: bool,
}

pub fn channel<T>(capacity: usize) -> (Sender<T>, Receiver<T>) {
    let shared = std::sync::Arc::new(Shared {
        queue: Mutex::new(Queue { items: VecDeque::new(), reserved: 0, closed: false }),
        capacity: capacity.max(1),
        receiver: AtomicWaker::new(),
        room: Notify::new(),
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl<T> Shared<T> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue<T>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<T> Sender<T> {
    pub fn try_send(&self, value: T) -> Result<(), TrySendError<T>> {
        let mut q = self.0.lock();
        if q.closed {
            return Err(TrySendError::Closed(value));
        }
        if q.items.len() + q.reserved >= self.0.capacity {
            return Err(TrySendError::Full(value));
        }
        q.items.push_back(value);
        drop(q);
        self.0.receiver.wake();
        Ok(())
    }

    /// Waits for room and reserves it. Cancel-safe: a dropped wait reserves nothing.
    pub async fn reserve(&self) -> Result<Permit<'_, T>, Closed> {
        loop {
            // Registered before the check, so that room made in between is not missed.
            let notified = self.0.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = self.0.lock();
                if q.closed {
                    return Err(Closed);
                }
                if q.items.len() + q.reserved < self.0.capacity {
                    q.reserved += 1;
                    return Ok(Permit { shared: &self.0, used: false });
                }
            }
            notified.await;
        }
    }

    /// Free slots.
    pub fn capacity(&self) -> usize {
        let q = self.0.lock();
        self.0.capacity.saturating_sub(q.items.len() + q.reserved)
    }

    pub fn max_capacity(&self) -> usize {
        self.0.capacity
    }
}

impl<T> Permit<'_, T> {
    pub fn send(mut self, value: T) {
        self.used = true;
        let mut q = self.shared.lock();
        q.reserved -= 1;
        q.items.push_back(value);
        drop(q);
        self.shared.receiver.wake();
    }
}

impl<T> Drop for Permit<'_, T> {
    fn drop(&mut self) {
        if !self.used {
            self.shared.lock().reserved -= 1;
            self.shared.room.notify_waiters();
        }
    }
}

impl<T> Receiver<T> {
    pub fn try_recv(&mut self) -> Option<T> {
        let mut q = self.0.lock();
        let was_full = q.items.len() + q.reserved >= self.0.capacity;
        let value = q.items.pop_front()?;
        if q.items.is_empty() && q.items.capacity() > KEEP_CAPACITY {
            q.items = VecDeque::new();
        }
        drop(q);
        if was_full {
            self.0.room.notify_waiters();
        }
        Some(value)
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<T> {
        if let Some(v) = self.try_recv() {
            return Poll::Ready(v);
        }
        self.0.receiver.register(cx.waker());
        match self.try_recv() {
            Some(v) => Poll::Ready(v),
            None => Poll::Pending,
        }
    }

    /// The next message. Cancel-safe: nothing is taken unless it is returned.
    pub async fn recv(&mut self) -> T {
        poll_fn(|cx| self.poll_recv(cx)).await
    }

    /// Frees the queue's memory if it is empty and more than a few slots (before hibernating).
    pub fn release(&mut self) {
        let mut q = self.0.lock();
        if q.items.is_empty() && q.items.capacity() > 8 {
            q.items = VecDeque::new();
        }
    }
}

impl<T> Drop for Receiver<T> {
    fn drop(&mut self) {
        self.0.lock().closed = true;
        self.0.room.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_order_and_publishers_wait_for_room() {
        let (tx, mut rx) = channel::<u32>(2);
        assert!(tx.try_send(1).is_ok());
        assert!(tx.try_send(2).is_ok());
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        assert_eq!((tx.capacity(), tx.max_capacity()), (0, 2));
        let tx = std::sync::Arc::new(tx);
        let waiting = {
            let tx = tx.clone();
            tokio::spawn(async move { tx.reserve().await.map(|p| p.send(3)).is_ok() })
        };
        tokio::task::yield_now().await;
        assert_eq!(rx.recv().await, 1);
        assert!(waiting.await.unwrap(), "room made by the receiver reached the waiting publisher");
        assert_eq!(rx.recv().await, 2);
        assert_eq!(rx.recv().await, 3);
        assert!(rx.try_recv().is_none());
        // A reservation given up returns its slot.
        drop(tx.reserve().await.unwrap());
        assert_eq!(tx.capacity(), 2);
        drop(rx);
        assert!(matches!(tx.try_send(4), Err(TrySendError::Closed(4))));
        assert!(tx.reserve().await.is_err());
    }

    #[tokio::test]
    async fn a_receiver_waiting_is_woken_and_a_drained_burst_is_freed() {
        let (tx, mut rx) = channel::<u32>(1000);
        let got = tokio::spawn(async move {
            let first = rx.recv().await;
            for _ in 0..499 {
                rx.recv().await;
            }
            (first, rx.0.lock().items.capacity())
        });
        tokio::task::yield_now().await;
        for i in 0..500 {
            while tx.try_send(i).is_err() {
                tokio::task::yield_now().await;
            }
        }
        let (first, capacity) = got.await.unwrap();
        assert_eq!(first, 0);
        assert!(capacity <= KEEP_CAPACITY, "{capacity}");
    }
}
