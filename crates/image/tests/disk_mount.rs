//! The ext4 rootfs disk loop-mounts read-only with the expected tree, owners, modes, links,
//! device nodes and xattrs. Needs root (as on the build and CI machines) for mount and mknod.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use image::{apply_layer, Digest, DiskCache, UnpackError, UnpackOptions};

#[derive(Debug, thiserror::Error)]
enum TestError {
    #[error(transparent)]
    Disk(#[from] image::DiskError),
    #[error(transparent)]
    Unpack(#[from] UnpackError),
}

fn header(kind: tar::EntryType, mode: u32, uid: u64, gid: u64, size: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(uid);
    h.set_gid(gid);
    h.set_size(size);
    h.set_mtime(1_650_000_000);
    h
}

fn layer() -> Vec<u8> {
    use tar::EntryType as E;
    let mut b = tar::Builder::new(Vec::new());
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static (hack/setup.sh)");
    b.append_data(&mut header(E::Directory, 0o755, 0, 0, 0), "bin", &[][..])
        .unwrap();
    b.append_data(
        &mut header(E::Regular, 0o755, 0, 0, busybox.len() as u64),
        "bin/busybox",
        &busybox[..],
    )
    .unwrap();
    b.append_link(
        &mut header(E::Link, 0o755, 0, 0, 0),
        "bin/sh",
        "bin/busybox",
    )
    .unwrap();
    b.append_link(&mut header(E::Symlink, 0o777, 0, 0, 0), "bin/ls", "busybox")
        .unwrap();
    b.append_data(&mut header(E::Directory, 0o1777, 0, 0, 0), "tmp", &[][..])
        .unwrap();
    b.append_data(
        &mut header(E::Directory, 0o750, 1000, 100, 0),
        "home/user",
        &[][..],
    )
    .unwrap();
    b.append_data(
        &mut header(E::Regular, 0o600, 1000, 100, 3),
        "home/user/key",
        &b"k\n\n"[..],
    )
    .unwrap();
    let mut dev = header(E::Char, 0o666, 0, 0, 0);
    dev.set_device_major(1).unwrap();
    dev.set_device_minor(3).unwrap();
    b.append_data(&mut dev, "dev/null", &[][..]).unwrap();
    b.append_pax_extensions([("SCHILY.xattr.user.role", &b"demo"[..])])
        .unwrap();
    b.append_data(
        &mut header(E::Regular, 0o644, 0, 0, 1),
        "etc/tagged",
        &b"t"[..],
    )
    .unwrap();
    b.into_inner().unwrap()
}

struct Mount<'a>(&'a Path);

impl Drop for Mount<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn rootfs_disk_loop_mounts_with_tree_owners_and_modes() {
    if !nix_is_root() {
        eprintln!("skipped: loop mount and mknod need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path().join("disks")).unwrap();
    let data = layer();
    let disk = cache
        .get_or_build(&Digest::sha256(b"mount test"), |tree| {
            apply_layer(tree, &data[..], &UnpackOptions::default())?;
            Ok::<_, TestError>(())
        })
        .unwrap();
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let out = Command::new("mount")
        .args(["-t", "ext4", "-o", "loop,ro"])
        .arg(&disk.path)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(out.status.success(), "loop mount failed: {out:?}");
    let _m = Mount(&mnt);

    let md = |p: &str| std::fs::symlink_metadata(mnt.join(p)).unwrap();
    assert_eq!(
        std::fs::read(mnt.join("bin/busybox")).unwrap(),
        std::fs::read("/bin/busybox").unwrap()
    );
    assert_eq!(md("bin/sh").ino(), md("bin/busybox").ino());
    assert_eq!(md("bin/busybox").mode() & 0o7777, 0o755);
    assert_eq!(
        std::fs::read_link(mnt.join("bin/ls")).unwrap(),
        Path::new("busybox")
    );
    assert_eq!(md("tmp").mode() & 0o7777, 0o1777);
    let home = md("home/user");
    assert_eq!(
        (home.uid(), home.gid(), home.mode() & 0o7777),
        (1000, 100, 0o750)
    );
    let key = md("home/user/key");
    assert_eq!(
        (key.uid(), key.gid(), key.mode() & 0o7777),
        (1000, 100, 0o600)
    );
    assert_eq!(key.mtime(), 1_650_000_000);
    let null = md("dev/null");
    assert!(null.file_type().is_char_device());
    assert_eq!(null.rdev(), libc::makedev(1, 3));
    assert_eq!(
        getxattr(&mnt.join("etc/tagged"), "user.role").as_deref(),
        Some(&b"demo"[..])
    );
    // Read-only: writes fail.
    assert!(std::fs::write(mnt.join("tmp/x"), b"x").is_err());
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn getxattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    use std::os::unix::ffi::OsStrExt;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    let mut buf = [0u8; 64];
    // SAFETY: valid NUL-terminated strings and a writable buffer of the given length.
    let len =
        unsafe { libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(len).ok().map(|l| buf[..l].to_vec())
}
