//! A 16550A UART, as much of it as Linux's 8250 driver needs for a console that only
//! transmits: the registers it probes (scratch, IER, the loopback modem lines, the FIFO bits of
//! IIR) and the "transmitter empty" interrupt. Received data never arrives.

/// Port base of COM1.
pub const COM1: u16 = 0x3f8;
/// Its ISA interrupt line.
pub const COM1_IRQ: u32 = 4;

const IER_THRI: u8 = 0x02;
const MCR_LOOP: u8 = 0x10;
const LCR_DLAB: u8 = 0x80;
/// LSR: transmitter holding register and transmitter empty.
const LSR_IDLE: u8 = 0x60;

/// What a register access asks of the machine.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// A byte to print.
    pub out: Option<u8>,
    /// Raise the interrupt line (an edge).
    pub irq: bool,
}

/// The UART's registers.
#[derive(Debug, Default)]
pub struct Serial {
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    dll: u8,
    dlm: u8,
    fifo: bool,
    /// A "transmitter empty" interrupt is pending (cleared by reading IIR).
    thre: bool,
}

impl Serial {
    /// A write of `v` to register `off` (0–7).
    pub fn write(&mut self, off: u16, v: u8) -> Effect {
        let dlab = self.lcr & LCR_DLAB != 0;
        let mut e = Effect::default();
        match off {
            0 if dlab => self.dll = v,
            0 => {
                if self.mcr & MCR_LOOP == 0 {
                    e.out = Some(v);
                }
                // sent at once: the holding register is empty again
                self.thre = true;
                e.irq = self.ier & IER_THRI != 0;
            }
            1 if dlab => self.dlm = v,
            1 => {
                let was = self.ier;
                self.ier = v & 0x0f;
                if self.ier & IER_THRI != 0 && was & IER_THRI == 0 {
                    self.thre = true;
                    e.irq = true;
                }
            }
            2 => self.fifo = v & 1 != 0,
            3 => self.lcr = v,
            4 => self.mcr = v & 0x1f,
            7 => self.scr = v,
            _ => {}
        }
        e
    }

    /// A read of register `off` (0–7).
    pub fn read(&mut self, off: u16) -> u8 {
        let dlab = self.lcr & LCR_DLAB != 0;
        match off {
            0 if dlab => self.dll,
            0 => 0,
            1 if dlab => self.dlm,
            1 => self.ier,
            2 => {
                let fifo = if self.fifo { 0xc0 } else { 0 };
                if self.ier & IER_THRI != 0 && self.thre {
                    self.thre = false;
                    fifo | 0x02
                } else {
                    fifo | 0x01
                }
            }
            3 => self.lcr,
            4 => self.mcr,
            5 => LSR_IDLE,
            6 if self.mcr & MCR_LOOP != 0 => {
                let m = self.mcr;
                ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            }
            6 => 0xb0, // DCD, DSR, CTS
            _ => self.scr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_as_linux_does() {
        let mut s = Serial::default();
        // IER test
        s.write(1, 0);
        assert_eq!(s.read(1) & 0x0f, 0);
        s.write(1, 0x0f);
        assert_eq!(s.read(1) & 0x0f, 0x0f);
        s.write(1, 0);
        // loopback: OUT2 | RTS read back as DCD | CTS
        s.write(4, 0x10 | 0x0a);
        assert_eq!(s.read(6) & 0xf0, 0x90);
        assert_eq!(s.write(0, b'x').out, None, "loopback prints nothing");
        s.write(4, 0);
        // FIFO: a 16550A
        s.write(2, 1);
        assert_eq!(s.read(2) & 0xc0, 0xc0);
        // scratch
        s.write(7, 0xa5);
        assert_eq!(s.read(7), 0xa5);
    }

    #[test]
    fn transmit_interrupts() {
        let mut s = Serial::default();
        assert_eq!(
            s.write(0, b'a'),
            Effect {
                out: Some(b'a'),
                irq: false
            }
        );
        assert_eq!(s.read(2) & 0x0f, 0x01, "no interrupt with IER off");
        assert!(s.write(1, IER_THRI).irq, "enabling THRI with an empty THR");
        assert_eq!(s.read(2) & 0x0f, 0x02);
        assert_eq!(s.read(2) & 0x0f, 0x01, "reading IIR acknowledged it");
        let e = s.write(0, b'b');
        assert!(e.irq && e.out == Some(b'b'));
        assert_eq!(s.read(5), 0x60);
    }
}
