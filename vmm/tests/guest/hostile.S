# mvm VMM test guest (after lib.S and virtio.S): a hostile driver. It touches ports and MMIO
# nothing decodes, then abuses the first virtio-blk device — notifications before setup, rings
# outside guest memory, an avail index far beyond the queue, a descriptor loop, an
# out-of-range sector, a buffer of almost 4 GiB — checking after each that the VMM answered
# as the spec says (DEVICE_NEEDS_RESET, an IOERR status) and is still there. Powers off when
# it got through all of it.

        .text
        .globl _start

_start:
        mov     %rsi, %r15
        lea     msg_hello(%rip), %rdi
        call    puts

        # Ports and MMIO nobody decodes read as all ones; writes go nowhere.
        mov     $0x80, %dx
        mov     $0x55, %al
        out     %al, %dx
        mov     $0xcf8, %dx
        mov     $0x80000000, %eax
        out     %eax, %dx
        mov     $0xcfc, %dx
        in      %dx, %eax
        lea     msg_port_not_ones(%rip), %rdi
        cmp     $0xffffffff, %eax
        jne     fail
        mov     $0xffff, %dx
        in      %dx, %al
        mov     $0xe0000000, %rax
        movl    $0x12345678, (%rax)
        mov     (%rax), %ebx
        lea     msg_mmio_not_ones(%rip), %rdi
        cmp     $0xffffffff, %ebx
        jne     fail
        mov     $0xd000f000, %rax               # a virtio window with no device
        mov     (%rax), %ebx
        cmp     $0xffffffff, %ebx
        jne     fail
        mov     $0x70, %dx                      # CMOS status A: not updating
        mov     $0x8a, %al
        out     %al, %dx
        mov     $0x71, %dx
        in      %dx, %al
        lea     msg_cmos(%rip), %rdi
        cmp     $0x26, %al
        jne     fail
        lea     msg_stray_ok(%rip), %rdi
        call    puts

        call    find_devices
        lea     msg_no_device(%rip), %rdi
        cmpq    $0, device_count(%rip)
        je      fail
        mov     device_bases(%rip), %r12
        mov     $DEVICE_AREA, %r13

        # Notifications before any setup, for queues that exist and that do not.
        movl    $0, R_QUEUE_NOTIFY(%r12)
        movl    $0xffffffff, R_QUEUE_NOTIFY(%r12)

        # Rings outside guest memory: DRIVER_OK is refused with DEVICE_NEEDS_RESET.
        xor     %r8d, %r8d
        call    dev_init
        movl    $0, R_QUEUE_SEL(%r12)
        movl    $Q_SIZE, R_QUEUE_NUM(%r12)
        movl    $0xfff00000, R_QUEUE_DESC(%r12)
        movl    $0x7, R_QUEUE_DESC+4(%r12)
        movl    $0xfff01000, R_QUEUE_AVAIL(%r12)
        movl    $0x7, R_QUEUE_AVAIL+4(%r12)
        movl    $0xfff02000, R_QUEUE_USED(%r12)
        movl    $0x7, R_QUEUE_USED+4(%r12)
        movl    $1, R_QUEUE_READY(%r12)
        movl    $0xf, R_STATUS(%r12)
        mov     R_STATUS(%r12), %eax
        lea     msg_rings_accepted(%rip), %rdi
        and     $0x44, %eax
        cmp     $0x40, %eax
        jne     fail
        movl    $0, R_QUEUE_NOTIFY(%r12)
        lea     msg_rings_ok(%rip), %rdi
        call    puts

        # An avail index far beyond the queue: the device gives up until reset.
        xor     %r8d, %r8d
        call    dev_init
        xor     %edx, %edx
        call    queue_init
        call    dev_ready
        movw    $0x8000, Q_AVAIL+2(%r13)
        movl    $0, R_QUEUE_NOTIFY(%r12)
        mov     $100000, %ecx
1:      testl   $0x40, R_STATUS(%r12)
        jnz     2f
        dec     %ecx
        jnz     1b
        lea     msg_avail_accepted(%rip), %rdi
        jmp     fail
2:      lea     msg_avail_ok(%rip), %rdi
        call    puts

        # A descriptor loop: 0 -> 1 -> 2 -> 1 -> ... The device must answer and go on.
        xor     %r8d, %r8d
        call    dev_init
        xor     %edx, %edx
        call    queue_init
        call    dev_ready
        lea     BLK_HEADER(%r13), %rax
        movl    $0, (%rax)                      # VIRTIO_BLK_T_IN
        movq    $0, 8(%rax)
        mov     %r13, %rsi
        lea     BLK_HEADER(%r13), %rdi
        mov     $16, %edx
        mov     $DESC_F_NEXT, %r8d
        mov     $1, %r9d
        xor     %ecx, %ecx
        call    set_desc
        lea     BLK_DATA(%r13), %rdi
        mov     $512, %edx
        mov     $(DESC_F_NEXT | DESC_F_WRITE), %r8d
        mov     $2, %r9d
        mov     $1, %ecx
        call    set_desc
        lea     BLK_STATUS(%r13), %rdi
        mov     $1, %edx
        mov     $(DESC_F_NEXT | DESC_F_WRITE), %r8d
        mov     $1, %r9d
        mov     $2, %ecx
        call    set_desc
        xor     %edx, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        lea     msg_loop_broke(%rip), %rdi
        testl   $0x40, R_STATUS(%r12)
        jnz     fail
        # ... and a good request right after works.
        xor     %edx, %edx
        mov     $1, %ecx
        mov     $DESC_F_WRITE, %r8d
        call    blk_request
        lea     msg_after_loop(%rip), %rdi
        test    %eax, %eax
        jnz     fail
        lea     msg_loop_ok(%rip), %rdi
        call    puts

        # A sector far past the end: IOERR.
        xor     %edx, %edx
        movabs  $0x7fffffffffffffff, %rcx
        mov     $DESC_F_WRITE, %r8d
        call    blk_request
        lea     msg_range_accepted(%rip), %rdi
        cmp     $1, %eax
        jne     fail
        lea     msg_range_ok(%rip), %rdi
        call    puts

        # A data buffer of almost 4 GiB in 64 MiB of RAM: IOERR.
        xor     %edx, %edx
        xor     %ecx, %ecx
        mov     $DESC_F_WRITE, %r8d
        call    blk_request                     # lays out the chain; now enlarge the buffer
        movl    $0xfffffe00, 16+8(%r13)         # descriptor 1's length
        movb    $0xee, BLK_STATUS(%r13)
        xor     %edx, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        movzbl  BLK_STATUS(%r13), %eax
        lea     msg_oversize_accepted(%rip), %rdi
        cmp     $1, %eax
        jne     fail
        lea     msg_oversize_ok(%rip), %rdi
        call    puts
        jmp     pass

        .section .rodata
msg_hello:              .asciz "mvm-guest: hostile driver\n"
msg_stray_ok:           .asciz "mvm-guest: stray port and MMIO accesses survived\n"
msg_rings_ok:           .asciz "mvm-guest: rings outside guest memory: DEVICE_NEEDS_RESET\n"
msg_avail_ok:           .asciz "mvm-guest: avail index beyond the queue: DEVICE_NEEDS_RESET\n"
msg_loop_ok:            .asciz "mvm-guest: descriptor loop answered, device still works\n"
msg_range_ok:           .asciz "mvm-guest: sector past the end: IOERR\n"
msg_oversize_ok:        .asciz "mvm-guest: 4 GiB buffer: IOERR\n"
msg_port_not_ones:      .asciz "unclaimed port did not read all ones"
msg_mmio_not_ones:      .asciz "unclaimed MMIO did not read all ones"
msg_cmos:               .asciz "CMOS status A"
msg_no_device:          .asciz "no virtio device"
msg_rings_accepted:     .asciz "rings outside guest memory accepted"
msg_avail_accepted:     .asciz "avail index beyond the queue accepted"
msg_loop_broke:         .asciz "descriptor loop broke the device"
msg_after_loop:         .asciz "request after the loop failed"
msg_range_accepted:     .asciz "sector past the end not refused"
msg_oversize_accepted:  .asciz "4 GiB buffer not refused"
