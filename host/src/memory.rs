//! Building the core's large fixed-size values on the heap.
//!
//! A trainer for a realistic configuration is tens of megabytes. The core
//! builds it by value (`const fn new`), which on the host would first place
//! it on the stack; these helpers do that on a thread whose stack is large
//! enough and hand back the box, so no unsafe zeroed allocation is needed.

use anyhow::{anyhow, Context};

/// `Box::new(make())`, evaluated on a thread with a stack large enough for
/// a few copies of `T`.
pub fn boxed<T: Send + 'static>(make: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<Box<T>> {
    let stack = 3 * size_of::<T>() + (16 << 20);
    std::thread::Builder::new()
        .name("negcache-alloc".into())
        .stack_size(stack)
        .spawn(move || Box::new(make()))
        .context("cannot start a thread to build a large value")?
        .join()
        .map_err(|_| anyhow!("building a large value panicked"))
}
