//! The one integration test binary. Tests run against the real `ekko`
//! binary and real external components; see each module.

mod util;

mod engine;
mod fuse;
mod nbd;

mod capture;
mod gc;
mod libvirt;
mod s3;
