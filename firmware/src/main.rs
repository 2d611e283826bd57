//! The firmware: trains the library's model on a Cortex-M4 and reports
//! through semihosting (QEMU's `-semihosting-config enable=on` prints to
//! its own stdout and turns `debug::exit` into its exit code).
//!
//! Besides the library's lines (the same as the host's), it prints where
//! the memory went: the linker's section bounds for RAM and flash, and the
//! stack's high-water mark, measured by painting.
#![no_std]
#![no_main]
// One audited read of the painted stack area needs `unsafe`; everything
// else is safe code.
#![deny(unsafe_code)]

use core::fmt::Write;

use cortex_m_rt::entry;
use cortex_m_semihosting::{debug, hio};
use negcache_firmware::{run, write_sizes, SCRATCH, SETTINGS, TRAINER};

// Symbols defined by cortex-m-rt's `link.x` (see its section layout).
// Only their addresses are taken, which is safe; nothing reads them.
extern "C" {
    static __stext: u8;
    static __etext: u8;
    static __srodata: u8;
    static __erodata: u8;
    static __sdata: u8;
    static __edata: u8;
    static __sidata: u8;
    static __sbss: u8;
    static __ebss: u8;
    static _stack_end: u8;
    static _stack_start: u8;
}

/// The RAM and flash regions of `memory.x`, repeated here for the
/// percentages only (the linker enforces the real limits).
const RAM_ORIGIN: usize = 0x2000_0000;
const RAM_BYTES: usize = 256 * 1024;
const FLASH_BYTES: usize = 1024 * 1024;

fn addr(sym: *const u8) -> usize {
    sym as usize
}

/// The word cortex-m-rt's `paint-stack` feature fills the stack with
/// before `main`.
const PAINT: u32 = 0xcccc_cccc;

/// Bytes of stack ever used: the distance from the top of RAM to the
/// lowest word that no longer holds the paint.
fn stack_high_water() -> usize {
    let (bottom, top) = (addr(&raw const _stack_end), addr(&raw const _stack_start));
    let mut a = bottom;
    while a < top {
        // SAFETY: [_stack_end, _stack_start) is the stack region of RAM,
        // 4-byte aligned by link.x; the words below the current stack
        // pointer belong to no Rust object, and a volatile read of a u32
        // there has no side effect (plain SRAM).
        #[allow(unsafe_code)]
        let w = unsafe { core::ptr::read_volatile(a as *const u32) };
        if w != PAINT {
            break;
        }
        a += 4;
    }
    top - a
}

fn report_memory(out: &mut dyn Write) -> core::fmt::Result {
    let text = addr(&raw const __etext) - addr(&raw const __stext);
    let rodata = addr(&raw const __erodata) - addr(&raw const __srodata);
    let data = addr(&raw const __edata) - addr(&raw const __sdata);
    let bss = addr(&raw const __ebss) - addr(&raw const __sbss);
    // Flash holds everything up to the end of .data's load image.
    let flash = addr(&raw const __sidata) + data;
    let statics = addr(&raw const _stack_end) - RAM_ORIGIN;
    let stack_room = addr(&raw const _stack_start) - addr(&raw const _stack_end);
    writeln!(
        out,
        "mem flash used={flash} of {FLASH_BYTES} ({}%): text={text} rodata={rodata} data_image={data}",
        flash * 100 / FLASH_BYTES
    )?;
    writeln!(
        out,
        "mem ram static={statics} of {RAM_BYTES} ({}%): data={data} bss={bss}; stack room={stack_room}",
        statics * 100 / RAM_BYTES
    )
}

/// Ends the run: QEMU exits with the status; without a semihosting host
/// (real hardware, no debugger) `exit` returns, and the core sleeps.
fn finish(status: debug::ExitStatus) -> ! {
    debug::exit(status);
    loop {
        cortex_m::asm::wfi();
    }
}

#[entry]
fn main() -> ! {
    let Ok(mut out) = hio::hstdout() else {
        // No semihosting host: nothing to report to.
        finish(debug::EXIT_FAILURE)
    };
    let result = (|| -> Result<(), negcache_firmware::RunError> {
        writeln!(out, "negcache-firmware on cortex-m4")?;
        report_memory(&mut out)?;
        write_sizes(&mut out)?;
        run(TRAINER.take(), SCRATCH.take(), &SETTINGS, &mut out)?;
        // Measured after the run, so it covers training and evaluation.
        let used = stack_high_water();
        writeln!(out, "mem stack peak={used} ram total={}", addr(&raw const _stack_end) - RAM_ORIGIN + used)?;
        writeln!(out, "done")?;
        Ok(())
    })();
    match result {
        Ok(()) => finish(debug::EXIT_SUCCESS),
        Err(e) => {
            let _ = writeln!(out, "error: {e}");
            finish(debug::EXIT_FAILURE)
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    if let Ok(mut out) = hio::hstderr() {
        let _ = writeln!(out, "panic: {info}");
    }
    finish(debug::EXIT_FAILURE)
}
