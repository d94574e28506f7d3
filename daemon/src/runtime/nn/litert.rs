//! A thin FFI to LiteRT's C API (`libLiteRt.so`, the TFLite runtime), loaded at run time.
//!
//! The library is opened with `libloading`, so the daemon builds and runs without it; only
//! models need it. Signatures follow the 2.3 headers (`litert/c/*.h`). 2.3 differs from the
//! 2.1.4 headers vendored by `litert-sys` in one way that matters: the model constructors take
//! the environment first. The old signatures link fine and fail at the first call. A model is
//! made from a buffer, our own mapping of its file (LiteRT reads it in place, no copy), so
//! that its pages can be handed back once compiled (see [`super::mapped`]).
//!
//! LiteRT prints INFO lines on stderr and exports no logger API, so calls that log (opening,
//! compiling, tearing down) run under [`quietly`], which routes those lines into tracing.
//!
//! Safe wrappers: [`Library`] (the symbols plus one environment), [`Model`] (a loaded
//! flatbuffer and its first signature's tensor types) and [`Compiled`] (a compiled model with
//! its own input and output buffers: one inference at a time).

use std::ffi::{CString, c_char, c_int, c_void};
use std::path::Path;
use std::ptr;
use std::sync::Arc;

use super::mapped::Mapped;

type Status = c_int;
type Handle = *mut c_void;

const OK: Status = 0;
const HW_ACCELERATOR_CPU: c_int = 1;
const TENSOR_BUFFER_HOST_MEMORY: c_int = 1;
const LOCK_READ: c_int = 0;
const LOCK_WRITE: c_int = 1;

/// `LiteRtElementType` values we name; they equal TFLite's `TfLiteType`.
pub const ELEMENT_F32: c_int = 1;
pub const ELEMENT_U8: c_int = 3;

const MAX_RANK: usize = 8;

/// `LiteRtLayout`: `unsigned rank : 7; bool has_strides : 1;` share the first 32-bit unit.
#[repr(C)]
#[derive(Clone, Copy)]
struct Layout {
    rank_bits: u32,
    dimensions: [i32; MAX_RANK],
    strides: [u32; MAX_RANK],
}

/// `LiteRtRankedTensorType`.
#[repr(C)]
#[derive(Clone, Copy)]
struct RankedTensorType {
    element_type: c_int,
    layout: Layout,
}

const _: () = assert!(size_of::<Layout>() == 68 && size_of::<RankedTensorType>() == 72);

/// The symbols we call, resolved once.
struct Api {
    create_environment: unsafe extern "C" fn(c_int, *const c_void, *mut Handle) -> Status,
    destroy_environment: unsafe extern "C" fn(Handle),
    create_model_from_buffer: unsafe extern "C" fn(Handle, *const c_void, usize, *mut Handle) -> Status,
    destroy_model: unsafe extern "C" fn(Handle),
    get_model_signature: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    get_num_signature_inputs: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    get_num_signature_outputs: unsafe extern "C" fn(Handle, *mut usize) -> Status,
    get_signature_input_tensor_by_index: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    get_signature_output_tensor_by_index: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    get_ranked_tensor_type: unsafe extern "C" fn(Handle, *mut RankedTensorType) -> Status,
    create_options: unsafe extern "C" fn(*mut Handle) -> Status,
    destroy_options: unsafe extern "C" fn(Handle),
    set_options_hardware_accelerators: unsafe extern "C" fn(Handle, c_int) -> Status,
    create_opaque_options: unsafe extern "C" fn(
        *const c_char,
        *mut c_void,
        Option<unsafe extern "C" fn(*mut c_void)>,
        *mut Handle,
    ) -> Status,
    add_opaque_options: unsafe extern "C" fn(Handle, Handle) -> Status,
    create_compiled_model: unsafe extern "C" fn(Handle, Handle, Handle, *mut Handle) -> Status,
    destroy_compiled_model: unsafe extern "C" fn(Handle),
    run_compiled_model: unsafe extern "C" fn(Handle, usize, usize, *mut Handle, usize, *mut Handle) -> Status,
    create_managed_tensor_buffer:
        unsafe extern "C" fn(Handle, c_int, *const RankedTensorType, usize, *mut Handle) -> Status,
    destroy_tensor_buffer: unsafe extern "C" fn(Handle),
    lock_tensor_buffer: unsafe extern "C" fn(Handle, *mut *mut c_void, c_int) -> Status,
    unlock_tensor_buffer: unsafe extern "C" fn(Handle) -> Status,
}

/// The opened library and the one environment all its models share.
pub struct Library {
    api: Api,
    env: Handle,
    /// Never closed: LiteRT starts threads and registers C++ statics, so unloading it (on a
    /// reload, say) is not safe. A second open of the same path reuses the mapping.
    _lib: std::mem::ManuallyDrop<libloading::Library>,
}

// SAFETY: the environment is created once and only read by LiteRT afterwards; LiteRT
// documents it as shareable across compiled models and threads.
unsafe impl Send for Library {}
unsafe impl Sync for Library {}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {path}: {cause}")]
    Open { path: String, cause: String },
    #[error("{call} failed: {}", status_name(*.status))]
    Call { call: &'static str, status: Status },
    #[error("{0}")]
    Unsupported(String),
}

fn check(call: &'static str, status: Status) -> Result<(), Error> {
    if status == OK { Ok(()) } else { Err(Error::Call { call, status }) }
}

/// Names from `LiteRtStatus` in `litert_common.h`, for messages a user can act on.
fn status_name(status: Status) -> String {
    let name = match status {
        1 => "invalid argument",
        2 => "memory allocation failure",
        3 => "runtime failure",
        4 => "missing input tensor",
        5 => "unsupported",
        6 => "not found",
        8 => "wrong version",
        500 => "file I/O error",
        501 => "invalid flatbuffer (not a TFLite model?)",
        502 => "dynamic loading",
        504 => "compilation",
        _ => "error",
    };
    format!("{name} (status {status})")
}

impl Library {
    /// Opens `libLiteRt.so` at `path` and creates the shared environment.
    pub fn open(path: &Path) -> Result<Arc<Library>, Error> {
        let open_err = |cause: String| Error::Open { path: path.display().to_string(), cause };
        // SAFETY: loading runs the library's initialisers; libLiteRt's only need libc/libstdc++.
        let lib = unsafe { libloading::Library::new(path) }.map_err(|e| open_err(e.to_string()))?;
        macro_rules! sym {
            ($name:literal) => {
                // SAFETY: the type on the field this fills is the 2.3 header's prototype.
                *unsafe { lib.get(concat!($name, "\0").as_bytes()) }
                    .map_err(|e| open_err(format!("missing symbol {}: {e}", $name)))?
            };
        }
        let api = Api {
            create_environment: sym!("LiteRtCreateEnvironment"),
            destroy_environment: sym!("LiteRtDestroyEnvironment"),
            create_model_from_buffer: sym!("LiteRtCreateModelFromBuffer"),
            destroy_model: sym!("LiteRtDestroyModel"),
            get_model_signature: sym!("LiteRtGetModelSignature"),
            get_num_signature_inputs: sym!("LiteRtGetNumSignatureInputs"),
            get_num_signature_outputs: sym!("LiteRtGetNumSignatureOutputs"),
            get_signature_input_tensor_by_index: sym!("LiteRtGetSignatureInputTensorByIndex"),
            get_signature_output_tensor_by_index: sym!("LiteRtGetSignatureOutputTensorByIndex"),
            get_ranked_tensor_type: sym!("LiteRtGetRankedTensorType"),
            create_options: sym!("LiteRtCreateOptions"),
            destroy_options: sym!("LiteRtDestroyOptions"),
            set_options_hardware_accelerators: sym!("LiteRtSetOptionsHardwareAccelerators"),
            create_opaque_options: sym!("LiteRtCreateOpaqueOptions"),
            add_opaque_options: sym!("LiteRtAddOpaqueOptions"),
            create_compiled_model: sym!("LiteRtCreateCompiledModel"),
            destroy_compiled_model: sym!("LiteRtDestroyCompiledModel"),
            run_compiled_model: sym!("LiteRtRunCompiledModel"),
            create_managed_tensor_buffer: sym!("LiteRtCreateManagedTensorBuffer"),
            destroy_tensor_buffer: sym!("LiteRtDestroyTensorBuffer"),
            lock_tensor_buffer: sym!("LiteRtLockTensorBuffer"),
            unlock_tensor_buffer: sym!("LiteRtUnlockTensorBuffer"),
        };
        let mut env = ptr::null_mut();
        // SAFETY: no options; `env` is an out-pointer.
        check("LiteRtCreateEnvironment", quietly(|| unsafe { (api.create_environment)(0, ptr::null(), &mut env) }))?;
        Ok(Arc::new(Library { api, env, _lib: std::mem::ManuallyDrop::new(lib) }))
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // SAFETY: every Model and Compiled holds an Arc<Library>, so none outlives this.
        quietly(|| unsafe { (self.api.destroy_environment)(self.env) })
    }
}

/// A tensor's element type and shape, as the model declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorType {
    pub element: c_int,
    pub dims: Vec<u32>,
}

impl TensorType {
    pub fn element_size(&self) -> usize {
        match self.element {
            ELEMENT_F32 => 4,
            _ => 1,
        }
    }

    pub fn byte_len(&self) -> usize {
        self.dims.iter().map(|&d| d as usize).product::<usize>() * self.element_size()
    }
}

/// A loaded model: the flatbuffer, parsed once. Compile it as often as contexts are needed.
pub struct Model {
    lib: Arc<Library>,
    handle: Handle,
    pub inputs: Vec<TensorType>,
    pub outputs: Vec<TensorType>,
    raw_inputs: Vec<RankedTensorType>,
    raw_outputs: Vec<RankedTensorType>,
    /// The flatbuffer the handle reads; dropped after it (fields drop in order).
    file: Mapped,
}

// SAFETY: a LiteRtModel is immutable after loading; compiled models only read it.
unsafe impl Send for Model {}
unsafe impl Sync for Model {}

impl Model {
    pub fn load(lib: &Arc<Library>, path: &Path) -> Result<Arc<Model>, Error> {
        let api = &lib.api;
        let file = Mapped::open(path).map_err(|e| Error::Unsupported(format!("{}: {e}", path.display())))?;
        let mut handle = ptr::null_mut();
        // SAFETY: the buffer is the mapping `file`, which the model keeps until after
        // `destroy_model`; `handle` is an out-pointer.
        check("LiteRtCreateModelFromBuffer", unsafe {
            (api.create_model_from_buffer)(lib.env, file.as_ptr(), file.len(), &mut handle)
        })?;
        let mut model = Model {
            lib: lib.clone(),
            handle,
            inputs: vec![],
            outputs: vec![],
            raw_inputs: vec![],
            raw_outputs: vec![],
            file,
        };
        let mut signature = ptr::null_mut();
        // SAFETY: the model handle is valid; the signature lives as long as the model.
        unsafe {
            check("LiteRtGetModelSignature", (api.get_model_signature)(handle, 0, &mut signature))?;
            let (mut n_in, mut n_out) = (0usize, 0usize);
            check("LiteRtGetNumSignatureInputs", (api.get_num_signature_inputs)(signature, &mut n_in))?;
            check("LiteRtGetNumSignatureOutputs", (api.get_num_signature_outputs)(signature, &mut n_out))?;
            model.raw_inputs = tensor_types(
                api,
                "LiteRtGetSignatureInputTensorByIndex",
                api.get_signature_input_tensor_by_index,
                signature,
                n_in,
            )?;
            model.raw_outputs = tensor_types(
                api,
                "LiteRtGetSignatureOutputTensorByIndex",
                api.get_signature_output_tensor_by_index,
                signature,
                n_out,
            )?;
        }
        model.inputs = model.raw_inputs.iter().map(public_type).collect::<Result<_, _>>()?;
        model.outputs = model.raw_outputs.iter().map(public_type).collect::<Result<_, _>>()?;
        Ok(Arc::new(model))
    }

    /// Compiles the model for the CPU (XNNPACK with `threads` threads), with its own buffers.
    pub fn compile(self: &Arc<Model>, threads: u32) -> Result<Compiled, Error> {
        let api = &self.lib.api;
        let mut options = ptr::null_mut();
        // SAFETY: plain out-pointers and handles created just above; `options` is destroyed
        // below whatever happens, and owns the opaque options once they are added.
        unsafe {
            check("LiteRtCreateOptions", (api.create_options)(&mut options))?;
            let compiled = (|| {
                check(
                    "LiteRtSetOptionsHardwareAccelerators",
                    (api.set_options_hardware_accelerators)(options, HW_ACCELERATOR_CPU),
                )?;
                // XNNPACK reads its settings as TOML from an opaque option; the payload is a
                // C string that LiteRT frees through the destructor we pass.
                let payload = CString::new(format!("num_threads = {threads}\n")).expect("no NUL");
                let mut opaque = ptr::null_mut();
                let raw = payload.into_raw() as *mut c_void;
                let status = (api.create_opaque_options)(c"xnnpack".as_ptr(), raw, Some(free_cstring), &mut opaque);
                if status != OK {
                    free_cstring(raw);
                }
                check("LiteRtCreateOpaqueOptions", status)?;
                check("LiteRtAddOpaqueOptions", (api.add_opaque_options)(options, opaque))?;
                let mut compiled = ptr::null_mut();
                let status = quietly(|| (api.create_compiled_model)(self.lib.env, self.handle, options, &mut compiled));
                check("LiteRtCreateCompiledModel", status)?;
                Ok(compiled)
            })();
            (api.destroy_options)(options);
            let handle = compiled?;
            let mut ctx = Compiled { model: self.clone(), handle, inputs: vec![], outputs: vec![] };
            for t in &self.raw_inputs {
                ctx.inputs.push(self.buffer(t)?);
            }
            for t in &self.raw_outputs {
                ctx.outputs.push(self.buffer(t)?);
            }
            Ok(ctx)
        }
    }

    /// Hands back the flatbuffer's pages once every context is compiled (see [`Mapped`]).
    pub fn release_file_pages(&self) {
        self.file.release();
    }

    fn buffer(&self, t: &RankedTensorType) -> Result<Handle, Error> {
        let size = public_type(t)?.byte_len();
        let mut buf = ptr::null_mut();
        // SAFETY: `t` came from this model; LiteRT allocates and owns the host memory.
        check("LiteRtCreateManagedTensorBuffer", unsafe {
            (self.lib.api.create_managed_tensor_buffer)(self.lib.env, TENSOR_BUFFER_HOST_MEMORY, t, size, &mut buf)
        })?;
        Ok(buf)
    }
}

impl Drop for Model {
    fn drop(&mut self) {
        // SAFETY: every Compiled holds an Arc<Model>, so nothing uses the handle any more.
        unsafe { (self.lib.api.destroy_model)(self.handle) }
    }
}

unsafe extern "C" fn free_cstring(p: *mut c_void) {
    // SAFETY: `p` came from `CString::into_raw` in `Model::compile`.
    drop(unsafe { CString::from_raw(p as *mut c_char) });
}

/// The types of a signature's `n` inputs or outputs, through `by_index` (the input or the
/// output getter).
///
/// # Safety
/// `signature` must be a valid signature handle of a live model.
unsafe fn tensor_types(
    api: &Api,
    call: &'static str,
    by_index: unsafe extern "C" fn(Handle, usize, *mut Handle) -> Status,
    signature: Handle,
    n: usize,
) -> Result<Vec<RankedTensorType>, Error> {
    (0..n)
        .map(|i| {
            let mut tensor = ptr::null_mut();
            // SAFETY: `i < n`, the count LiteRT gave for this signature.
            check(call, unsafe { by_index(signature, i, &mut tensor) })?;
            unsafe { ranked_type(api, tensor) }
        })
        .collect()
}

unsafe fn ranked_type(api: &Api, tensor: Handle) -> Result<RankedTensorType, Error> {
    let mut t = RankedTensorType {
        element_type: 0,
        layout: Layout { rank_bits: 0, dimensions: [0; MAX_RANK], strides: [0; MAX_RANK] },
    };
    // SAFETY: `tensor` is a live tensor of a live model (the caller's contract).
    check("LiteRtGetRankedTensorType", unsafe { (api.get_ranked_tensor_type)(tensor, &mut t) })?;
    Ok(t)
}

fn public_type(t: &RankedTensorType) -> Result<TensorType, Error> {
    let rank = (t.layout.rank_bits & 0x7f) as usize;
    let dims = &t.layout.dimensions[..rank.min(MAX_RANK)];
    if dims.iter().any(|&d| d <= 0) {
        return Err(Error::Unsupported(format!("dynamic tensor shape {dims:?}")));
    }
    if !matches!(t.element_type, ELEMENT_U8 | ELEMENT_F32) {
        return Err(Error::Unsupported(format!("tensor element type {} (only u8 and f32)", t.element_type)));
    }
    Ok(TensorType { element: t.element_type, dims: dims.iter().map(|&d| d as u32).collect() })
}

/// A compiled model with one set of input and output buffers: one inference at a time.
pub struct Compiled {
    model: Arc<Model>,
    handle: Handle,
    inputs: Vec<Handle>,
    outputs: Vec<Handle>,
}

// SAFETY: a compiled model and its buffers are used by one thread at a time (`&mut self`).
unsafe impl Send for Compiled {}
unsafe impl Sync for Compiled {}

impl Compiled {
    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Copies `data` into input `index`; its length must be the tensor's byte length.
    pub fn write_input(&mut self, index: usize, data: &[u8]) -> Result<(), Error> {
        let (buf, ty) = match (self.inputs.get(index), self.model.inputs.get(index)) {
            (Some(b), Some(t)) => (*b, t),
            _ => return Err(Error::Unsupported(format!("no input {index}"))),
        };
        if data.len() != ty.byte_len() {
            return Err(Error::Unsupported(format!(
                "input {index} takes {} bytes ({:?}), got {}",
                ty.byte_len(),
                ty.dims,
                data.len()
            )));
        }
        self.with_locked(buf, LOCK_WRITE, |mem| mem.copy_from_slice(data), ty.byte_len())
    }

    pub fn run(&mut self) -> Result<(), Error> {
        // SAFETY: the buffers were created for this model's first signature.
        check("LiteRtRunCompiledModel", unsafe {
            (self.model.lib.api.run_compiled_model)(
                self.handle,
                0,
                self.inputs.len(),
                self.inputs.as_mut_ptr(),
                self.outputs.len(),
                self.outputs.as_mut_ptr(),
            )
        })
    }

    /// A copy of output `index`.
    pub fn read_output(&mut self, index: usize) -> Result<Vec<u8>, Error> {
        let (buf, len) = match (self.outputs.get(index), self.model.outputs.get(index)) {
            (Some(b), Some(t)) => (*b, t.byte_len()),
            _ => return Err(Error::Unsupported(format!("no output {index}"))),
        };
        let mut out = vec![0; len];
        self.with_locked(buf, LOCK_READ, |mem| out.copy_from_slice(mem), len)?;
        Ok(out)
    }

    /// Zeroes every input and output buffer, so nothing of one call is left for the next.
    pub fn clear(&mut self) -> Result<(), Error> {
        let model = self.model.clone();
        let buffers = self.inputs.iter().zip(&model.inputs).chain(self.outputs.iter().zip(&model.outputs));
        for (buf, ty) in buffers {
            self.with_locked(*buf, LOCK_WRITE, |mem| mem.fill(0), ty.byte_len())?;
        }
        Ok(())
    }

    fn with_locked(&self, buf: Handle, mode: c_int, f: impl FnOnce(&mut [u8]), len: usize) -> Result<(), Error> {
        let api = &self.model.lib.api;
        let mut mem = ptr::null_mut();
        // SAFETY: a managed host buffer of at least `len` bytes (we sized it), mapped while locked.
        unsafe {
            check("LiteRtLockTensorBuffer", (api.lock_tensor_buffer)(buf, &mut mem, mode))?;
            f(std::slice::from_raw_parts_mut(mem as *mut u8, len));
            check("LiteRtUnlockTensorBuffer", (api.unlock_tensor_buffer)(buf))
        }
    }
}

impl Drop for Compiled {
    fn drop(&mut self) {
        let api = &self.model.lib.api;
        // SAFETY: owned handles, destroyed once; buffers before the compiled model.
        unsafe {
            for b in self.inputs.drain(..).chain(self.outputs.drain(..)) {
                (api.destroy_tensor_buffer)(b);
            }
            quietly(|| (api.destroy_compiled_model)(self.handle));
        }
    }
}

/// Runs `f` with fd 2 captured, then logs what LiteRT printed through tracing (INFO and
/// WARNING at debug: they are about absent GPUs and NPUs; ERROR at warn). Anything else that
/// reached stderr meanwhile (another thread's output) is passed through unchanged.
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    use std::io::{Read, Write};
    static CAPTURE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = CAPTURE.lock().unwrap_or_else(|e| e.into_inner());
    let setup = || -> nix::Result<_> {
        let saved = nix::unistd::dup(std::io::stderr())?;
        let (read, write) = nix::unistd::pipe()?;
        nix::unistd::dup2_stderr(&write)?;
        // A reader thread, so a chatty call can never fill the pipe and block.
        let reader = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::fs::File::from(read).read_to_string(&mut text);
            text
        });
        Ok((saved, write, reader))
    };
    let Ok((saved, write, reader)) = setup() else { return f() };
    let out = f();
    let _ = nix::unistd::dup2_stderr(&saved);
    drop(write);
    let text = reader.join().unwrap_or_default();
    for line in text.lines() {
        if let Some(msg) = line.strip_prefix("ERROR: ") {
            tracing::warn!(target: "litert", "{msg}");
        } else if let Some(msg) = ["INFO: ", "WARNING: ", "VERBOSE: "].iter().find_map(|p| line.strip_prefix(p)) {
            tracing::debug!(target: "litert", "{msg}");
        } else {
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }
    out
}
