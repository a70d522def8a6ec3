//! Files qfold reads and writes, handled as hostile input.
//!
//! Reading: [`open_regular`] opens only regular files, deciding from metadata before the open and
//! opening non-blocking, so a FIFO, a device or a directory is refused at once instead of
//! blocking or streaming forever; [`confined`] resolves a file a model or data set refers to
//! and refuses it when its canonical path leaves the folder it must stay in (symbolic links
//! included).
//!
//! Writing: [`Staged`] is a temporary file created exclusively, under an unpredictable name, in
//! the destination folder; [`commit`] renames staged files into place as one step, undoing the
//! first rename when a later one fails. Live temporary files are listed in a process-wide
//! registry so a signal handler can remove them ([`remove_temp_files_and_exit`]).
//! [`check_output`] refuses, before any work, an output that would replace an input.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::error::{Error, Result};

/// What a non-regular file is, for messages.
fn kind(meta: &Metadata) -> &'static str {
    let ft = meta.file_type();
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if ft.is_fifo() {
            return "a FIFO";
        }
        if ft.is_char_device() {
            return "a character device";
        }
        if ft.is_block_device() {
            return "a block device";
        }
        if ft.is_socket() {
            return "a socket";
        }
    }
    if ft.is_dir() {
        "a directory"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "not a regular file"
    }
}

fn not_regular(meta: &Metadata) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidInput,
        format!("is {}, not a regular file", kind(meta)),
    )
}

/// Whether two metadata describe the same file.
fn same_inode(a: &Metadata, b: &Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        a.len() == b.len() && a.modified().ok() == b.modified().ok()
    }
}

/// Opens `path` for reading only if it is a regular file, and returns it with its size. The
/// type is checked before opening (a FIFO would block the open, a device would stream forever)
/// and again on the open file, which is opened non-blocking in case it was swapped meanwhile.
pub fn open_regular(path: &Path) -> std::io::Result<(File, u64)> {
    let before = std::fs::metadata(path)?;
    if !before.is_file() {
        return Err(not_regular(&before));
    }
    let mut opts = OpenOptions::new();
    opts.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.custom_flags(libc::O_NONBLOCK);
    }
    let f = opts.open(path)?;
    let after = f.metadata()?;
    if !after.is_file() {
        return Err(not_regular(&after));
    }
    if !same_inode(&before, &after) {
        return Err(std::io::Error::other("was replaced while being opened"));
    }
    Ok((f, after.len()))
}

/// Reads a whole regular file of at most `limit` bytes.
pub fn read_regular(path: &Path, limit: u64) -> Result<Vec<u8>> {
    use std::io::Read;
    let (f, len) = open_regular(path).map_err(|e| Error::io(path, e))?;
    if len > limit {
        return Err(Error::io(
            path,
            std::io::Error::other(format!(
                "{len} bytes is more than the {limit} bytes qfold reads from such a file"
            )),
        ));
    }
    let mut bytes = Vec::new();
    bytes.try_reserve_exact(len as usize).map_err(|_| {
        Error::io(
            path,
            std::io::Error::other(format!("cannot allocate {len} bytes")),
        )
    })?;
    f.take(len)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// The canonical form of `root`, the folder files must stay in.
pub fn canonical_dir(root: &Path) -> std::io::Result<PathBuf> {
    let root = if root.as_os_str().is_empty() {
        Path::new(".")
    } else {
        root
    };
    root.canonicalize()
}

/// The canonical path of `path`, which must lie inside `root` (already canonical) once every
/// symbolic link is resolved; otherwise the reason.
pub fn confined(root: &Path, path: &Path) -> std::result::Result<PathBuf, String> {
    let canonical = path
        .canonicalize()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !canonical.starts_with(root) || canonical == root {
        return Err(format!(
            "{} resolves to '{}', outside the folder '{}' (a symbolic link?)",
            path.display(),
            canonical.display(),
            root.display()
        ));
    }
    Ok(canonical)
}

/// Whether `a` and `b` name the same existing file (after symbolic links, `..`, hard links).
pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => same_inode(&x, &y),
        _ => false,
    }
}

/// The folder a file path lives in (`.` for a bare file name).
pub fn folder_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The external data file saving `path` writes: `<file name>.data` beside it.
pub fn data_path_for(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?;
    let mut n = name.to_os_string();
    n.push(".data");
    Some(path.with_file_name(n))
}

/// Refuses an output path that cannot be written safely: a missing or read-only folder, or a
/// directory, a FIFO, a device or anything else that is not a regular file at `output`. Called by
/// [`crate::onnx::save`] and, before any work, by the CLI.
pub fn check_destination(output: &Path) -> Result<()> {
    let usage = |what: String| Error::Usage(format!("{}: {what}", output.display()));
    if output.file_name().is_none() {
        return Err(usage("not a file path".into()));
    }
    let folder = folder_of(output);
    match std::fs::metadata(&folder) {
        Ok(m) if m.is_dir() => {}
        Ok(m) => {
            return Err(usage(format!(
                "the output folder '{}' is {}",
                folder.display(),
                kind(&m)
            )))
        }
        Err(e) => {
            return Err(usage(format!(
                "the output folder '{}' does not exist ({e})",
                folder.display()
            )))
        }
    }
    regular_or_absent(output, "the output")?;
    // Writable: a probe file is created (exclusively, under a random name) and removed, so
    // a read-only folder fails here, not after the work.
    tempfile::Builder::new()
        .prefix(".qfold-probe.")
        .tempfile_in(&folder)
        .map(drop)
        .map_err(|e| {
            usage(format!(
                "the output folder '{}' is not writable ({e})",
                folder.display()
            ))
        })
}

/// Refuses an external data file `<output>.data` that exists and is not a regular file.
pub fn check_data_destination(output: &Path) -> Result<()> {
    match data_path_for(output) {
        Some(d) => regular_or_absent(&d, "the output's external data file"),
        None => Ok(()),
    }
}

fn regular_or_absent(p: &Path, what: &str) -> Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if !m.is_file() => Err(Error::Usage(format!(
            "{}: {what} exists and is {}; qfold only replaces regular files",
            p.display(),
            kind(&m)
        ))),
        _ => Ok(()),
    }
}

/// Refuses, before anything is loaded or computed, an output that is not writable
/// ([`check_destination`]) or that is the input model itself (`m.onnx`, `sub/../m.onnx`, a
/// symbolic or hard link to it) unless `in_place` asks for exactly that. The output's external
/// data file may not be the input model either.
pub fn check_output(input: &Path, output: &Path, in_place: bool) -> Result<()> {
    check_destination(output)?;
    if same_file(output, input) && !in_place {
        return Err(Error::Usage(format!(
            "-o {}: this is the input model {}; qfold never replaces its input \
             (give another output, or --in-place to replace the model on purpose)",
            output.display(),
            input.display()
        )));
    }
    if let Some(d) = data_path_for(output) {
        if same_file(&d, input) {
            return Err(Error::Usage(format!(
                "-o {}: its external data file {} would replace the input model",
                output.display(),
                d.display()
            )));
        }
    }
    Ok(())
}

/// Refuses an output that is, or whose external data file `<output>.data` is, one of the
/// input's external data files (`inputs`: the files the input model was read from, model
/// first, as in [`crate::onnx::Model::files`]). With `in_place` and the output being the model
/// itself, its external data file may be the input's: the new one replaces it only once the
/// new model is complete.
pub fn check_output_against(inputs: &[PathBuf], output: &Path, in_place: bool) -> Result<()> {
    let replacing_model = inputs.first().is_some_and(|m| same_file(output, m));
    for data in inputs.iter().skip(1) {
        if same_file(output, data) {
            return Err(Error::Usage(format!(
                "-o {}: this is an external data file of the input model ({}); \
                 qfold never replaces its input",
                output.display(),
                data.display()
            )));
        }
        if let Some(d) = data_path_for(output) {
            if same_file(&d, data) && !(in_place && replacing_model) {
                return Err(Error::Usage(format!(
                    "-o {}: its external data file {} is the input model's external data \
                     file and would be replaced; give another output name",
                    output.display(),
                    d.display()
                )));
            }
        }
    }
    Ok(())
}

/// Refuses a side output (`--save-ranges FILE`) that is a file the input model was read from
/// (`inputs`, as in [`crate::onnx::Model::files`]) or the main output, or that exists and is not
/// a regular file. `flag` names it in the message.
pub fn check_side_output(flag: &str, path: &Path, inputs: &[PathBuf], output: &Path) -> Result<()> {
    check_destination(path)?;
    if let Some(f) = inputs.iter().find(|f| same_file(path, f)) {
        return Err(Error::Usage(format!(
            "{flag} {}: this is a file of the input model ({}); qfold never replaces its input",
            path.display(),
            f.display()
        )));
    }
    if same_file(path, output) || path == output {
        return Err(Error::Usage(format!(
            "{flag} {}: this is also the output model",
            path.display()
        )));
    }
    Ok(())
}

/// Paths of the temporary files this process is writing.
static LIVE: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn live() -> MutexGuard<'static, Vec<PathBuf>> {
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every temporary file qfold is writing, then exits with `code`. For the signal
/// handler of a program built on qfold (the CLI calls it on SIGINT, SIGTERM and SIGHUP). It
/// waits for a [`commit`] in progress, so a model and its data file are both in place or
/// neither is.
pub fn remove_temp_files_and_exit(code: i32) -> ! {
    let guard = live();
    for p in guard.iter() {
        let _ = std::fs::remove_file(p);
    }
    // Exit holding the lock: no new temporary file can appear, no commit can start.
    std::process::exit(code)
}

/// A temporary file in the destination folder, created exclusively (`O_EXCL`) under an
/// unpredictable name, so a planted file or symbolic link cannot redirect the write. Removed on
/// drop unless committed.
pub struct Staged {
    file: Option<tempfile::NamedTempFile>,
    path: PathBuf,
    dest: PathBuf,
}

impl Staged {
    /// A new temporary file for `dest`, in `dest`'s folder.
    pub fn new(dest: &Path) -> Result<Staged> {
        let name = dest
            .file_name()
            .ok_or_else(|| Error::Usage(format!("{}: not a file path", dest.display())))?;
        let prefix = format!(".{}.", name.to_string_lossy());
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".qfold.tmp");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            // What File::create would give (umask applies), not tempfile's 0600.
            builder.permissions(std::fs::Permissions::from_mode(0o666));
        }
        let mut registry = live();
        // Name the destination, not the temporary, in the error: that is the path the user gave.
        let file = builder
            .tempfile_in(folder_of(dest))
            .map_err(|e| Error::io(dest, e))?;
        let path = file.path().to_path_buf();
        registry.push(path.clone());
        Ok(Staged {
            file: Some(file),
            path,
            dest: dest.to_path_buf(),
        })
    }

    /// Writes everything `f` writes to the file, then flushes and syncs it.
    pub fn write_with(&mut self, f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
        let dest = self.dest.clone();
        let file = self
            .file
            .as_mut()
            .expect("a staged file is open until committed");
        {
            let mut w = BufWriter::new(file.as_file_mut());
            f(&mut w)?;
            w.flush().map_err(|e| Error::io(&dest, e))?;
        }
        file.as_file().sync_all().map_err(|e| Error::io(&dest, e))
    }

    /// The destination.
    pub fn dest(&self) -> &Path {
        &self.dest
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // Removes the file (unless committed), then forgets it.
        drop(self.file.take());
        live().retain(|p| p != &self.path);
    }
}

/// Renames staged files onto their destinations in order, as one step: if a rename fails, the
/// destinations already renamed are put back as they were (the previous file restored, or the
/// new one removed) and every temporary file is removed. Signals wait until it is done. Put
/// the file that others refer to (external data) first and the model last.
pub fn commit(staged: Vec<Staged>) -> Result<()> {
    let mut registry = live();
    // (destination, backup of what it held) for each rename done, to undo on failure.
    let mut done: Vec<(PathBuf, Option<tempfile::TempPath>)> = Vec::new();
    let mut result = Ok(());
    let mut staged = staged;
    for s in staged.iter_mut() {
        let dest = s.dest.clone();
        let backup = if std::fs::symlink_metadata(&dest).is_ok() {
            tempfile::Builder::new()
                .prefix(".qfold-backup.")
                .make_in(folder_of(&dest), |p| std::fs::hard_link(&dest, p))
                .ok()
                .map(|f| f.into_temp_path())
        } else {
            None
        };
        let Some(file) = s.file.take() else { continue };
        match file.persist(&dest) {
            Ok(_) => done.push((dest, backup)),
            Err(e) => {
                result = Err(Error::io(&dest, e.error));
                break;
            }
        }
    }
    if result.is_err() {
        for (dest, backup) in done.into_iter().rev() {
            match backup {
                Some(b) => {
                    let _ = b.persist(&dest);
                }
                None => {
                    let _ = std::fs::remove_file(&dest);
                }
            }
        }
    }
    for s in &staged {
        registry.retain(|p| p != &s.path);
    }
    drop(registry);
    drop(staged);
    result
}

/// Writes `bytes` to `path` atomically (a [`Staged`] file, then [`commit`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    check_destination(path)?;
    let mut s = Staged::new(path)?;
    s.write_with(|w| w.write_all(bytes).map_err(|e| Error::io(path, e)))?;
    commit(vec![s])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_files_are_removed_unless_committed() {
        let dir = std::env::temp_dir().join(format!("qfold-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dest = dir.join("out.bin");
        {
            let mut s = Staged::new(&dest).unwrap();
            s.write_with(|w| w.write_all(b"abc").map_err(|e| Error::io("x", e)))
                .unwrap();
            assert!(s.path.exists());
            assert!(live().contains(&s.path));
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        assert!(live().is_empty());
        write_atomic(&dest, b"xyz").unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), b"xyz");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
