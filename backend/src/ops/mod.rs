//! Operations, in the middle: opening a disk's versions as the catalog says, and the offline
//! disk operations (`disk import/export/snapshot`, `disk tee/untee`, offline migration and
//! promote, the maps check). They return their own [`OpsError`]; the faces and the daemon
//! call them, they call only the layers below (the request path's metrics, the crates).

pub mod diskio;
pub mod maps;
pub mod teed;
