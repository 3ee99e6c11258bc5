//! Recreating the tree's System V IPC objects for `migrate-resume`, before anything forks: each
//! shared memory segment, semaphore set and message queue is created again with its key, mode
//! and contents (segment bytes, semaphore values, queued messages in order). The kernel gives
//! them new ids; `MIGRATE_SYSV_IDS` (`m:old:new,s:old:new,q:old:new`, `M` for a segment that
//! had been marked for removal) tells every restored process's libmigrate, which keeps
//! answering to the old ids. A key already in use here is an error naming the key and the fix;
//! whatever was created is removed again if the resume fails before the program runs.

use crate::exit::{fail, TARGET};
use anyhow::Result;
use migrate_image::{SysvObject, TreeMeta};

/// SHM_DEST: the segment was removed (IPC_RMID) while still attached.
const SHM_DEST: u32 = 0o1000;

/// The objects this resume created. Dropping it removes them: it is dropped only when
/// migrate-resume fails before exec'ing the program (exec and `_exit` run no destructors).
pub struct Recreated {
    made: Vec<(&'static str, i32)>,
    /// The value of `MIGRATE_SYSV_IDS` (empty when the image has no System V object).
    pub env: String,
}

impl Drop for Recreated {
    fn drop(&mut self) {
        for &(kind, id) in self.made.iter().rev() {
            // SAFETY: IPC_RMID with no buffer on an object this process created.
            unsafe {
                match kind {
                    "m" => libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                    "s" => libc::semctl(id, 0, libc::IPC_RMID),
                    _ => libc::msgctl(id, libc::IPC_RMID, std::ptr::null_mut()),
                };
            }
        }
    }
}

/// "message queue key 0x0000abcd" / "private message queue 3".
fn describe(noun: &str, key: i32, id: i32) -> String {
    if key == 0 {
        format!("private System V {noun} (id {id} at the checkpoint)")
    } else {
        format!("System V {noun} key {:#010x}", key as u32)
    }
}

/// The error for a failed get call: a taken key gets its own message and fix.
fn creation_error(noun: &str, key: i32, id: i32, ipcs: &str, ipcrm: &str) -> anyhow::Error {
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        let k = key as u32;
        return fail(
            TARGET,
            format!(
                "System V {noun} key {k:#010x} is already in use on this host (ipcs {ipcs}); remove it with \
                 `ipcrm {ipcrm} {k:#010x}` or resume elsewhere"
            ),
        );
    }
    fail(TARGET, format!("cannot recreate the {}: {err}", describe(noun, key, id)))
}

fn last_error(what: String) -> anyhow::Error {
    fail(TARGET, format!("{what}: {}", std::io::Error::last_os_error()))
}

/// Creates every System V object of the image.
pub fn recreate(tree: &TreeMeta) -> Result<Recreated> {
    let mut out = Recreated { made: Vec::new(), env: String::new() };
    let mut ids: Vec<String> = Vec::new();
    for object in &tree.sysv {
        match object {
            SysvObject::Shm { id, key, mode, size, contents } => {
                let noun = "shared memory segment";
                let excl = if *key == 0 { 0 } else { libc::IPC_EXCL };
                let flags = libc::IPC_CREAT | excl | (*mode & 0o777) as i32;
                // SAFETY: plain integers.
                let new = unsafe { libc::shmget(*key, *size as usize, flags) };
                if new < 0 {
                    return Err(creation_error(noun, *key, *id, "-m", "-M"));
                }
                out.made.push(("m", new));
                if contents.len() as u64 > *size {
                    return Err(fail(TARGET, format!("the image's {} is malformed", describe(noun, *key, *id))));
                }
                // SAFETY: attaching the segment we just created; `contents` fits in it.
                unsafe {
                    let at = libc::shmat(new, std::ptr::null(), 0);
                    if at as isize == -1 {
                        return Err(last_error(format!("cannot fill the {}", describe(noun, *key, *id))));
                    }
                    std::ptr::copy_nonoverlapping(contents.as_ptr(), at as *mut u8, contents.len());
                    libc::shmdt(at);
                }
                let letter = if *mode & SHM_DEST != 0 { 'M' } else { 'm' };
                ids.push(format!("{letter}:{id}:{new}"));
            }
            SysvObject::Sem { id, key, mode, values } => {
                let noun = "semaphore set";
                let excl = if *key == 0 { 0 } else { libc::IPC_EXCL };
                // SAFETY: plain integers.
                let new =
                    unsafe { libc::semget(*key, values.len() as i32, libc::IPC_CREAT | excl | (*mode & 0o777) as i32) };
                if new < 0 {
                    return Err(creation_error(noun, *key, *id, "-s", "-S"));
                }
                out.made.push(("s", new));
                let mut vals = values.clone();
                // SAFETY: SETALL reads one u16 per semaphore of the set from `vals`.
                if unsafe { libc::semctl(new, 0, libc::SETALL, vals.as_mut_ptr()) } < 0 {
                    return Err(last_error(format!("cannot set the values of the {}", describe(noun, *key, *id))));
                }
                ids.push(format!("s:{id}:{new}"));
            }
            SysvObject::Msg { id, key, mode, messages } => {
                let noun = "message queue";
                let what = || describe(noun, *key, *id);
                let excl = if *key == 0 { 0 } else { libc::IPC_EXCL };
                // SAFETY: plain integers.
                let new = unsafe { libc::msgget(*key, libc::IPC_CREAT | excl | (*mode & 0o777) as i32) };
                if new < 0 {
                    return Err(creation_error(noun, *key, *id, "-q", "-Q"));
                }
                out.made.push(("q", new));
                // The queue held that much: make room for it if this host's default is smaller.
                let total: usize = messages.iter().map(|(_, t)| t.len()).sum();
                // SAFETY: msqid_ds is plain data; IPC_STAT/IPC_SET on our own queue.
                unsafe {
                    let mut ds: libc::msqid_ds = std::mem::zeroed();
                    if libc::msgctl(new, libc::IPC_STAT, &mut ds) == 0 && (ds.msg_qbytes as usize) < total {
                        ds.msg_qbytes = total as _;
                        if libc::msgctl(new, libc::IPC_SET, &mut ds) < 0 {
                            return Err(last_error(format!(
                                "the {} held {total} bytes, more than a queue may hold here (kernel.msgmnb)",
                                what()
                            )));
                        }
                    }
                }
                for (n, (ty, text)) in messages.iter().enumerate() {
                    let mut buf = Vec::with_capacity(8 + text.len());
                    buf.extend_from_slice(&ty.to_ne_bytes());
                    buf.extend_from_slice(text);
                    // SAFETY: `buf` holds the type and `text.len()` bytes of text.
                    let r =
                        unsafe { libc::msgsnd(new, buf.as_ptr() as *const libc::c_void, text.len(), libc::IPC_NOWAIT) };
                    if r < 0 {
                        return Err(last_error(format!(
                            "cannot put message {} of {} ({} bytes) back into the {} (kernel.msgmax, kernel.msgmnb)",
                            n + 1,
                            messages.len(),
                            text.len(),
                            what()
                        )));
                    }
                }
                ids.push(format!("q:{id}:{new}"));
            }
        }
    }
    out.env = ids.join(",");
    Ok(out)
}
