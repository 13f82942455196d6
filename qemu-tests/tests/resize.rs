//! A disk grown while its guest runs fio verify: `dovetail ctl resize` on a raw image and a
//! parallax-v2 disk of a store (parallax-v1 grows through the same code without v2's page
//! moves; backend/tests/resize.rs grows it under the in-process frontend, which keeps this
//! VM test's time down). The guest must see the new size at once
//! (`/sys/block/vda/size`, changed by the config-change interrupt QEMU raises when the daemon
//! sends VHOST_USER_BACKEND_CONFIG_CHANGE_MSG), lose no verified write, and write and verify
//! past the old end and at the new last MiB. `ctl resize` must say the guest was told; the
//! store disks' `store check` must find the store consistent afterwards.

use std::path::Path;

use dovetail_qemu_tests::{
    create_store, dovetail_cli as dovetail, dovetail_ctl, say, scenario, workloads, Daemon, Error,
    Guest, Result,
};

fn utf8(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| Error::Setup(format!("{} is not UTF-8", p.display())))
}

/// Runs the guest against `socket`, grows disk `name` to 192 MiB over `control` while it
/// verifies, and checks what the guest saw.
fn grow_under_guest(what: &str, socket: &Path, control: &Path, name: &str) -> Result<()> {
    let mut guest = Guest::new(&format!("resize-{what}"))
        .disk(socket)
        .workload(workloads::RESIZE)
        .start()?;
    guest.wait_for("resized")?;
    std::thread::sleep(std::time::Duration::from_secs(1));
    let reply = dovetail_ctl(control, &["--json", "resize", name, "192M"])?;
    if !reply.contains("\"guest_told\":true") {
        return Err(Error::Check(format!(
            "`ctl resize` did not tell the guest: {reply}"
        )));
    }
    guest.resume("resized")?;
    let run = guest.finish()?;
    run.expect_ok(workloads::RESIZE_STEPS)?;
    let (old, new) = (run.info("old-sectors"), run.info("new-sectors"));
    if old != Some("262144") || new != Some("393216") {
        return Err(Error::Check(format!(
            "{what}: the guest saw {old:?} -> {new:?} sectors, expected 262144 -> 393216"
        )));
    }
    say(&format!(
        "resize {what}: {}; {} verify rounds under the resize",
        run.result("new-size").map_or("?", |r| r.detail.as_str()),
        run.result("verify-rounds")
            .map_or("?", |r| r.detail.as_str()),
    ));
    Ok(())
}

#[test]
fn raw_image_grows_under_fio_verify() {
    scenario("resize-raw", |s| {
        let control = s.path("ctl.sock");
        let _daemon = Daemon::dovetail(s.path("vd.img"))
            .size("128M")
            .arg("--control")
            .arg(utf8(&control)?)
            .spawn()?;
        grow_under_guest("raw", &s.path("vd.sock"), &control, "vd.img")?;
        let len = std::fs::metadata(s.path("vd.img"))
            .map_err(|e| Error::Check(format!("the image: {e}")))?
            .len();
        if len != 192 << 20 {
            return Err(Error::Check(format!(
                "the image is {len} bytes, not 192 MiB"
            )));
        }
        Ok(())
    });
}

#[test]
fn store_disks_grow_under_fio_verify() {
    // The store layouts this VM test grows, kept a list: one more is one more name here.
    #[allow(clippy::single_element_loop)]
    for layout in ["parallax-v2"] {
        scenario(&format!("resize-{layout}"), |s| {
            let store = s.path("store");
            create_store(&store, "1G", &[])?;
            dovetail(&[
                "disk".as_ref(),
                "create".as_ref(),
                store.as_os_str(),
                "vd".as_ref(),
                "--size".as_ref(),
                "128M".as_ref(),
                "--layout".as_ref(),
                layout.as_ref(),
            ])?;
            let control = s.path("ctl.sock");
            let mut daemon = Daemon::dovetail_store(&store, &["vd"])
                .arg("--control")
                .arg(utf8(&control)?)
                .spawn()?;
            grow_under_guest(layout, &daemon.socket_of("vd"), &control, "vd")?;
            daemon.terminate()?;
            let check = dovetail(&[
                "store".as_ref(),
                "check".as_ref(),
                store.as_os_str(),
                "--data".as_ref(),
            ])?;
            if !check.contains("result: consistent") {
                return Err(Error::Check(format!("store check: {check}")));
            }
            Ok(())
        });
    }
}
