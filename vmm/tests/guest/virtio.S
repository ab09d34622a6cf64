# A minimal virtio-mmio driver for the mvm VMM test guests (assembled after lib.S, before the
# guest): finds the virtio-mmio devices the way an OS does — RSDP, XSDT, FADT, DSDT, each
# "LNRO0005" device's Memory32Fixed window — and drives split queues of 8 entries, polled
# (interrupts stay off). Device i's memory is the 64 KiB at DEVICE_AREA + i*0x10000: queue q's
# rings in its page q, buffers from 0x8000; the current device's registers are in %r12, its
# memory in %r13.

        .set MAX_DEVICES, 8
        .set DEVICE_AREA, 0x400000      # device i's queues and buffers at DEVICE_AREA + i*0x10000
        .set SPIN_LIMIT, 20000000

        # virtio-mmio registers
        .set R_MAGIC, 0x00
        .set R_DEVICE_ID, 0x08
        .set R_DEVICE_FEATURES, 0x10
        .set R_DEVICE_FEATURES_SEL, 0x14
        .set R_DRIVER_FEATURES, 0x20
        .set R_DRIVER_FEATURES_SEL, 0x24
        .set R_QUEUE_SEL, 0x30
        .set R_QUEUE_NUM_MAX, 0x34
        .set R_QUEUE_NUM, 0x38
        .set R_QUEUE_READY, 0x44
        .set R_QUEUE_NOTIFY, 0x50
        .set R_STATUS, 0x70
        .set R_QUEUE_DESC, 0x80
        .set R_QUEUE_AVAIL, 0x90
        .set R_QUEUE_USED, 0xa0

        # a queue's layout in its 4 KiB page: descriptors, avail ring, used ring
        .set Q_AVAIL, 0x80
        .set Q_USED, 0x100
        .set Q_SIZE, 8

        .set DESC_F_NEXT, 1
        .set DESC_F_WRITE, 2

        # virtio-blk buffers, in the device's area
        .set BLK_HEADER, 0x8000
        .set BLK_STATUS, 0x8010
        .set BLK_DATA, 0x8200

        # virtio-console and virtio-rng buffers
        .set CON_RX, 0x8000
        .set CON_TX, 0x9000
        .set CTRL_RX, 0xa000            # four 256-byte control receive buffers
        .set CTRL_TX, 0xb000
        .set RNG_BUF, 0x8000

        .text
# find_devices: fills device_bases/device_count from the DSDT's LNRO0005 devices.
find_devices:
        mov     BP_ACPI_RSDP(%r15), %rax
        lea     msg_bad_rsdp(%rip), %rdi
        test    %rax, %rax
        jz      fail
        mov     24(%rax), %rbx                  # XSDT
        mov     4(%rbx), %ecx
        lea     36(%rbx), %rsi
        lea     (%rbx,%rcx), %r8
        lea     msg_no_fadt(%rip), %rdi
1:      cmp     %r8, %rsi
        jae     fail
        mov     (%rsi), %rax
        cmpl    $0x50434146, (%rax)             # "FACP"
        je      2f
        add     $8, %rsi
        jmp     1b
2:      mov     140(%rax), %rbx                 # X_DSDT
        lea     msg_no_dsdt(%rip), %rdi
        cmpl    $0x54445344, (%rbx)             # "DSDT"
        jne     fail
        mov     4(%rbx), %ecx
        lea     (%rbx,%rcx), %r8                # end of the DSDT
        lea     36(%rbx), %rsi
        xor     %r9d, %r9d
        movabs  $0x353030304f524e4c, %r10       # "LNRO0005"
3:      lea     8(%rsi), %rax
        cmp     %r8, %rax
        ja      6f
        cmp     (%rsi), %r10
        je      4f
        inc     %rsi
        jmp     3b
4:      add     $8, %rsi                        # the device's _CRS follows its _HID
5:      lea     12(%rsi), %rax
        cmp     %r8, %rax
        ja      6f
        cmpb    $0x86, (%rsi)                   # Memory32Fixed, length 9
        jne     7f
        cmpw    $0x0009, 1(%rsi)
        jne     7f
        mov     4(%rsi), %eax
        lea     device_bases(%rip), %rdx
        mov     %rax, (%rdx,%r9,8)
        inc     %r9
        add     $12, %rsi
        cmp     $MAX_DEVICES, %r9
        jb      3b
        jmp     6f
7:      inc     %rsi
        jmp     5b
6:      mov     %r9, device_count(%rip)
        ret

# dev_init: resets the device at %r12 and negotiates VIRTIO_F_VERSION_1 and the low feature
# bits in %r8d.
dev_init:
        movl    $0, R_STATUS(%r12)
        movl    $1, R_STATUS(%r12)              # ACKNOWLEDGE
        movl    $3, R_STATUS(%r12)              # DRIVER
        movl    $1, R_DEVICE_FEATURES_SEL(%r12)
        lea     msg_no_version_1(%rip), %rdi
        testl   $1, R_DEVICE_FEATURES(%r12)
        jz      fail
        movl    $1, R_DRIVER_FEATURES_SEL(%r12)
        movl    $1, R_DRIVER_FEATURES(%r12)
        movl    $0, R_DRIVER_FEATURES_SEL(%r12)
        mov     %r8d, R_DRIVER_FEATURES(%r12)
        movl    $0xb, R_STATUS(%r12)            # FEATURES_OK
        lea     msg_features_refused(%rip), %rdi
        testl   $8, R_STATUS(%r12)
        jz      fail
        ret

# queue_init: sets up queue %edx of the device at %r12 in page %edx of %r13.
queue_init:
        mov     %edx, %eax
        shl     $12, %rax
        lea     (%r13,%rax), %rdi
        xor     %ecx, %ecx
1:      movq    $0, (%rdi,%rcx,8)
        inc     %ecx
        cmp     $0x40, %ecx
        jb      1b
        mov     %edx, R_QUEUE_SEL(%r12)
        lea     msg_queue_too_small(%rip), %rsi
        cmpl    $Q_SIZE, R_QUEUE_NUM_MAX(%r12)
        jb      queue_fail
        movl    $Q_SIZE, R_QUEUE_NUM(%r12)
        mov     %edi, R_QUEUE_DESC(%r12)
        movl    $0, R_QUEUE_DESC+4(%r12)
        lea     Q_AVAIL(%rdi), %rax
        mov     %eax, R_QUEUE_AVAIL(%r12)
        movl    $0, R_QUEUE_AVAIL+4(%r12)
        lea     Q_USED(%rdi), %rax
        mov     %eax, R_QUEUE_USED(%r12)
        movl    $0, R_QUEUE_USED+4(%r12)
        movl    $1, R_QUEUE_READY(%r12)
        ret
queue_fail:
        mov     %rsi, %rdi
        jmp     fail

# dev_ready: sets DRIVER_OK and checks the device took it.
dev_ready:
        movl    $0xf, R_STATUS(%r12)
        mov     R_STATUS(%r12), %eax
        lea     msg_not_ready(%rip), %rdi
        and     $0x44, %eax                     # DRIVER_OK, DEVICE_NEEDS_RESET
        cmp     $4, %eax
        jne     fail
        ret

# virtq_submit: makes chain %ecx of queue %edx available, notifies the device, waits until
# it is used; returns the used length in %eax.
virtq_submit:
        call    virtq_post
        jmp     virtq_wait

# virtq_post: makes chain %ecx of queue %edx available and notifies the device; returns the
# new avail index in %eax (keeps %edx).
virtq_post:
        mov     %edx, %eax
        shl     $12, %rax
        lea     (%r13,%rax), %rsi
        movzwl  Q_AVAIL+2(%rsi), %eax           # avail.idx
        mov     %eax, %ebx
        and     $(Q_SIZE - 1), %ebx
        mov     %cx, Q_AVAIL+4(%rsi,%rbx,2)     # avail.ring[idx % size] = head
        inc     %eax
        mfence
        mov     %ax, Q_AVAIL+2(%rsi)
        mfence
        mov     %edx, R_QUEUE_NOTIFY(%r12)
        ret

# virtq_wait: waits until queue %edx's used index reaches %ax; returns the last used
# element's length in %eax.
virtq_wait:
        mov     %edx, %ecx
        shl     $12, %rcx
        lea     (%r13,%rcx), %rsi
        mov     $SPIN_LIMIT, %ecx
1:      cmp     Q_USED+2(%rsi), %ax
        je      2f
        dec     %ecx
        jnz     1b
        lea     msg_timeout(%rip), %rdi
        jmp     fail
2:      dec     %eax
        and     $(Q_SIZE - 1), %eax
        mov     Q_USED+8(%rsi,%rax,8), %eax     # used.ring[i].len
        ret

# set_desc: descriptor %ecx of queue page %rsi := {addr %rdi, len %edx, flags %r8w, next %r9w}.
set_desc:
        shl     $4, %ecx
        mov     %rdi, (%rsi,%rcx)
        mov     %edx, 8(%rsi,%rcx)
        mov     %r8w, 12(%rsi,%rcx)
        mov     %r9w, 14(%rsi,%rcx)
        ret

# blk_request: one request of type %edx for sector %rcx with the 512-byte data buffer
# (direction flags %r8d; none for flush) on queue 0. Returns the status byte in %eax and the
# used length in %ebx.
blk_request:
        push    %r8
        push    %rdx
        lea     BLK_HEADER(%r13), %rax
        mov     %edx, (%rax)
        movl    $0, 4(%rax)
        mov     %rcx, 8(%rax)
        movb    $0xee, BLK_STATUS(%r13)
        mov     %r13, %rsi
        lea     BLK_HEADER(%r13), %rdi          # 0: header
        mov     $16, %edx
        mov     $DESC_F_NEXT, %r8d
        mov     $1, %r9d
        pop     %rax
        push    %rax
        cmp     $4, %eax                        # a flush has no data: 0 -> 2
        jne     1f
        mov     $2, %r9d
1:      xor     %ecx, %ecx
        call    set_desc
        pop     %rdx
        pop     %r8
        lea     BLK_DATA(%r13), %rdi            # 1: data
        push    %rdx
        mov     $512, %edx
        or      $DESC_F_NEXT, %r8d
        mov     $2, %r9d
        mov     $1, %ecx
        call    set_desc
        lea     BLK_STATUS(%r13), %rdi          # 2: status
        mov     $1, %edx
        mov     $DESC_F_WRITE, %r8d
        xor     %r9d, %r9d
        mov     $2, %ecx
        call    set_desc
        pop     %rdx
        xor     %edx, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        mov     %eax, %ebx
        movzbl  BLK_STATUS(%r13), %eax
        ret

        .data
        .balign 8
device_count:           .quad 0
device_bases:           .fill MAX_DEVICES, 8, 0

        .section .rodata
msg_bad_rsdp:           .asciz "rsdp"
msg_no_fadt:            .asciz "no FADT in the XSDT"
msg_no_dsdt:            .asciz "no DSDT"
msg_no_version_1:       .asciz "no VIRTIO_F_VERSION_1"
msg_features_refused:   .asciz "FEATURES_OK refused"
msg_queue_too_small:    .asciz "queue too small"
msg_not_ready:          .asciz "DRIVER_OK refused"
msg_timeout:            .asciz "virtqueue timeout"
