# mvm VMM test guest (after lib.S and virtio.S): takes a virtio interrupt the way a kernel
# does. It installs an IDT, masks the 8259s, enables its local APIC, routes IOAPIC pin 5 (the
# first virtio device's GSI) to vector 0x30, enables interrupts, reads a sector from the disk,
# and waits for the used-buffer interrupt: the handler reads the device's InterruptStatus,
# acknowledges it and sends the LAPIC an EOI. Any other vector is a failure.

        .text
        .globl _start

        .set LAPIC, 0xfee00000
        .set LAPIC_TPR, 0x80
        .set LAPIC_EOI, 0xb0
        .set LAPIC_SVR, 0xf0
        .set IOAPIC, 0xfec00000
        .set VIRTIO_VECTOR, 0x30
        .set SPURIOUS_VECTOR, 0xff
        .set R_INTERRUPT_STATUS, 0x60
        .set R_INTERRUPT_ACK, 0x64

_start:
        mov     %rsi, %r15
        lea     msg_hello(%rip), %rdi
        call    puts

        # The IDT: every vector fails, but 0x30 (virtio) and 0xff (spurious).
        xor     %ecx, %ecx
1:      lea     unexpected(%rip), %rax
        cmp     $VIRTIO_VECTOR, %ecx
        jne     2f
        lea     virtio_irq(%rip), %rax
2:      cmp     $SPURIOUS_VECTOR, %ecx
        jne     3f
        lea     spurious(%rip), %rax
3:      call    set_gate
        inc     %ecx
        cmp     $256, %ecx
        jb      1b
        lea     idt(%rip), %rax
        mov     %rax, idtr+2(%rip)
        lidt    idtr(%rip)

        # No legacy PIC interrupts: mask both 8259s.
        mov     $0xff, %al
        out     %al, $0x21
        out     %al, $0xa1

        # The local APIC on, accepting every priority.
        mov     $LAPIC, %rbx
        movl    $0, LAPIC_TPR(%rbx)
        movl    $(0x100 | SPURIOUS_VECTOR), LAPIC_SVR(%rbx)

        # IOAPIC pin 5 -> vector 0x30, fixed, physical, edge, active high, to APIC 0.
        call    find_devices
        lea     msg_no_device(%rip), %rdi
        cmpq    $0, device_count(%rip)
        je      fail
        mov     device_bases(%rip), %r12
        mov     %r12, irq_device(%rip)
        mov     $DEVICE_AREA, %r13
        mov     $IOAPIC, %rbx
        movl    $(0x10 + 2 * 5), (%rbx)
        movl    $VIRTIO_VECTOR, 0x10(%rbx)
        movl    $(0x11 + 2 * 5), (%rbx)
        movl    $0, 0x10(%rbx)

        xor     %r8d, %r8d
        call    dev_init
        xor     %edx, %edx
        call    queue_init
        call    dev_ready
        sti
        xor     %edx, %edx                      # read sector 1
        mov     $1, %ecx
        mov     $DESC_F_WRITE, %r8d
        call    blk_request
        lea     msg_read_failed(%rip), %rdi
        test    %eax, %eax
        jnz     fail
        mov     $SPIN_LIMIT, %ecx
4:      cmpq    $0, irq_count(%rip)
        jne     5f
        dec     %ecx
        jnz     4b
        lea     msg_no_interrupt(%rip), %rdi
        jmp     fail
5:      cli
        lea     msg_interrupt(%rip), %rdi
        call    puts
        mov     irq_status(%rip), %rdi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts
        lea     msg_status_not_cleared(%rip), %rdi
        cmpl    $0, R_INTERRUPT_STATUS(%r12)
        jne     fail
        jmp     pass

# set_gate: IDT entry %ecx := a 64-bit interrupt gate to %rax, code selector 0x08.
set_gate:
        mov     %ecx, %edx
        shl     $4, %edx
        lea     idt(%rip), %rdi
        add     %rdx, %rdi
        mov     %ax, (%rdi)                     # offset 15:0
        movw    $0x08, 2(%rdi)                  # selector
        movw    $0x8e00, 4(%rdi)                # present, DPL 0, interrupt gate
        mov     %rax, %rdx
        shr     $16, %rdx
        mov     %dx, 6(%rdi)                    # offset 31:16
        shr     $16, %rdx
        mov     %edx, 8(%rdi)                   # offset 63:32
        movl    $0, 12(%rdi)
        ret

virtio_irq:
        push    %rax
        push    %rbx
        mov     irq_device(%rip), %rbx
        mov     R_INTERRUPT_STATUS(%rbx), %eax
        mov     %eax, R_INTERRUPT_ACK(%rbx)
        or      %rax, irq_status(%rip)
        incq    irq_count(%rip)
        mov     $LAPIC, %rbx
        movl    $0, LAPIC_EOI(%rbx)
        pop     %rbx
        pop     %rax
        iretq

spurious:
        iretq

unexpected:
        lea     msg_unexpected(%rip), %rdi
        jmp     fail

        .data
        .balign 16
idt:                    .fill 256 * 16, 1, 0
idtr:                   .word 256 * 16 - 1
                        .quad 0
        .balign 8
irq_device:             .quad 0
irq_count:              .quad 0
irq_status:             .quad 0

        .section .rodata
msg_hello:              .asciz "mvm-guest: interrupt check\n"
msg_interrupt:          .asciz "mvm-guest: virtio interrupt on vector 0x30, status "
msg_no_device:          .asciz "no virtio device"
msg_read_failed:        .asciz "blk read status"
msg_no_interrupt:       .asciz "no interrupt came"
msg_unexpected:         .asciz "an unexpected interrupt or exception"
msg_status_not_cleared: .asciz "InterruptStatus not cleared by the ACK"
