//! Scenario 4: discard and write-zeroes from the guest (blkdiscard, blkdiscard -z,
//! fallocate --punch-hole, fallocate --zero-range) read back as zeroes in the guest, are zeroes in
//! the host image, leave the rest of the image untouched, and the discarded range is deallocated
//! (a hole) in the image file where the host filesystem can show holes.

use dovetail_qemu_tests::image::{self, MIB};
use dovetail_qemu_tests::{say, scenario, workloads, Daemon, Error, Guest};

const IMAGE_MB: u64 = 64;
const REGION_MB: u64 = 4;
const DISCARD_AT: u64 = 8;
const ZEROOUT_AT: u64 = 16;
const PUNCH_AT: u64 = 24;
const ZERORANGE_AT: u64 = 32;
const KEEP_AT: u64 = 40;

#[test]
fn discard_and_write_zeroes() {
    scenario("discard", |s| {
        let image = s.path("disk.img");
        let len = usize::try_from(IMAGE_MB * MIB).map_err(|_| Error::Check("size".into()))?;
        let pattern = image::pattern(len, 4);
        image::write_file(&image, &pattern)?;
        let region = |at: u64| {
            let start = (at * MIB) as usize;
            &pattern[start..start + (REGION_MB * MIB) as usize]
        };
        let keep_sha = image::sha256(region(KEEP_AT))?;

        let mut daemon = Daemon::under_test(&image).spawn()?;
        Guest::new("discard")
            .disk(daemon.socket())
            .env("REGION_MB", REGION_MB)
            .env("DISCARD_AT", DISCARD_AT)
            .env("ZEROOUT_AT", ZEROOUT_AT)
            .env("PUNCH_AT", PUNCH_AT)
            .env("ZERORANGE_AT", ZERORANGE_AT)
            .env("KEEP_AT", KEEP_AT)
            .env("KEEP_SHA", &keep_sha)
            .workload(workloads::DISCARD)
            .boot()?
            .expect_ok(&[
                "discard-advertised",
                "write-zeroes-advertised",
                "blkdiscard",
                "blkdiscard-zeroout",
                "punch-hole",
                "zero-range",
                "zero-after-discard",
                "zero-after-zeroout",
                "zero-after-punch-hole",
                "zero-after-zero-range",
                "pattern-kept",
            ])?;
        daemon.terminate()?;

        // Host view: the four regions are zeroes, every other byte is the original pattern.
        let after = image::read_range(&image, 0, IMAGE_MB * MIB)?;
        let zeroed = [DISCARD_AT, ZEROOUT_AT, PUNCH_AT, ZERORANGE_AT];
        for mb in 0..IMAGE_MB {
            let r = (mb * MIB) as usize..((mb + 1) * MIB) as usize;
            let in_zeroed = zeroed.iter().any(|&at| mb >= at && mb < at + REGION_MB);
            let ok = if in_zeroed {
                after[r.clone()].iter().all(|&b| b == 0)
            } else {
                after[r.clone()] == pattern[r.clone()]
            };
            if !ok {
                return Err(Error::Check(format!(
                    "image MiB {mb}: expected {}, found other bytes",
                    if in_zeroed {
                        "zeroes"
                    } else {
                        "the original pattern"
                    }
                )));
            }
        }
        for (name, at) in [
            ("discard", DISCARD_AT),
            ("write-zeroes", ZEROOUT_AT),
            ("punch-hole", PUNCH_AT),
            ("zero-range", ZERORANGE_AT),
        ] {
            let allocated = image::allocated_bytes(&image, at * MIB, REGION_MB * MIB)?;
            say(&format!(
                "discard: {name} region: {allocated} of {} bytes still allocated in the image",
                REGION_MB * MIB
            ));
        }
        if image::holes_supported(s.dir())? {
            let allocated = image::allocated_bytes(&image, DISCARD_AT * MIB, REGION_MB * MIB)?;
            if allocated != 0 {
                return Err(Error::Check(format!(
                    "the discarded range is still allocated in the image ({allocated} bytes)"
                )));
            }
        } else {
            say("discard: the host filesystem does not report holes; hole check skipped");
        }
        Ok(())
    });
}
