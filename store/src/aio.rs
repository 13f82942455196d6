//! Reads a queue worker submits itself to a store whose data lives behind an asynchronous
//! interface (a store on RADOS: librados aio), beside the direct-I/O files it submits to
//! io_uring: the store hands out an [`AioRead`] for a range ([`crate::StoreFile::aio_source`],
//! [`crate::VersionSpace::aio_target`]), the worker starts the read and goes on; the read's
//! completion runs on the library's own thread and tells the worker through [`AioDone`].

use std::fmt;
use std::io;

/// What a finished asynchronous read calls, once, on whatever thread completed it: `Ok` when
/// every byte asked for is in the caller's buffers (bytes past the data's end read as zeros).
pub type AioDone = Box<dyn FnOnce(io::Result<()>) + Send + 'static>;

/// A source of asynchronous reads (a tier's objects on RADOS).
pub trait AioRead: Send + Sync + fmt::Debug {
    /// Starts reading the iovecs' total length at `offset` (a range the store handed out for
    /// this source, [`crate::StoreFile::aio_source`]) and returns at once; `done` is called
    /// when the read ended. `Err`: refused at submission, and `done` is never called.
    ///
    /// # Safety
    ///
    /// Every iovec must stay valid for writes of its whole length, and not be used otherwise,
    /// until `done` was called.
    unsafe fn aio_read(&self, offset: u64, iov: &[libc::iovec], done: AioDone) -> io::Result<()>;
}
