# mvm VMM test guest (after lib.S and virtio.S): finds the virtio-mmio devices through the
# ACPI tables, drives each with virtio.S's minimal driver, and reports on COM1:
#   virtio-blk, read-only: reads sector 1 and checks its marker; a write must fail (IOERR).
#   virtio-blk, read-write: writes a marker to sector 0, then flushes.
#   virtio-console: the multiport handshake finds port 1 named "mvm.agent"; on it, sends
#   "ping-from-guest", expects "pong-from-host", sends that back.
#   virtio-rng: asks for 32 bytes and checks they are not all zero.
# Powers off (S5) when every check passed; resets on the first failure.

        .text
        .globl _start

_start:
        mov     %rsi, %r15
        lea     msg_hello(%rip), %rdi
        call    puts
        call    find_devices
        lea     msg_devices(%rip), %rdi
        call    puts
        mov     device_count(%rip), %rdi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts

        xor     %r14d, %r14d                    # device index
next_device:
        cmp     device_count(%rip), %r14
        jae     pass
        lea     device_bases(%rip), %rax
        mov     (%rax,%r14,8), %r12             # its registers
        mov     %r14, %r13
        shl     $16, %r13
        add     $DEVICE_AREA, %r13              # its memory
        lea     msg_bad_magic(%rip), %rdi
        cmpl    $0x74726976, R_MAGIC(%r12)      # "virt"
        jne     fail
        lea     msg_device(%rip), %rdi
        call    puts
        mov     %r12, %rdi
        call    put_hex
        lea     msg_id(%rip), %rdi
        call    puts
        mov     R_DEVICE_ID(%r12), %edi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts
        mov     R_DEVICE_ID(%r12), %eax
        cmp     $2, %eax
        jne     1f
        call    blk_test
        jmp     2f
1:      cmp     $3, %eax
        jne     1f
        call    console_test
        jmp     2f
1:      cmp     $4, %eax
        jne     2f
        call    rng_test
2:      inc     %r14
        jmp     next_device

# blk_test: drives the disk at %r12 according to its read-only feature.
blk_test:
        xor     %r8d, %r8d
        call    dev_init
        movl    $0, R_DEVICE_FEATURES_SEL(%r12)
        mov     R_DEVICE_FEATURES(%r12), %eax
        and     $0x20, %eax                     # VIRTIO_BLK_F_RO
        push    %rax
        xor     %edx, %edx
        call    queue_init
        call    dev_ready
        pop     %rax
        test    %eax, %eax
        jz      blk_read_write

        # Read-only: sector 1 holds the marker; a write fails.
        xor     %edx, %edx                      # VIRTIO_BLK_T_IN
        mov     $1, %ecx
        mov     $DESC_F_WRITE, %r8d
        call    blk_request
        lea     msg_blk_read_failed(%rip), %rdi
        test    %eax, %eax
        jnz     fail
        cmp     $513, %ebx
        jne     fail
        lea     BLK_DATA(%r13), %rdi
        lea     disk_marker(%rip), %rsi
        mov     $disk_marker_len, %ecx
        call    memeq
        lea     msg_blk_bad_data(%rip), %rdi
        test    %eax, %eax
        jz      fail
        lea     msg_blk_read(%rip), %rdi
        call    puts
        lea     BLK_DATA(%r13), %rdi
        movb    $0, disk_marker_len(%rdi)
        call    puts
        lea     msg_newline(%rip), %rdi
        call    puts
        mov     $1, %edx                        # VIRTIO_BLK_T_OUT
        mov     $2, %ecx
        xor     %r8d, %r8d
        call    blk_request
        lea     msg_blk_ro_write(%rip), %rdi
        cmp     $1, %eax                        # VIRTIO_BLK_S_IOERR
        jne     fail
        lea     msg_blk_ro_refused(%rip), %rdi
        call    puts
        ret

blk_read_write:
        lea     BLK_DATA(%r13), %rdi
        lea     write_marker(%rip), %rsi
        mov     $write_marker_len, %ecx
1:      movb    (%rsi), %al
        movb    %al, (%rdi)
        inc     %rsi
        inc     %rdi
        dec     %ecx
        jnz     1b
        mov     $1, %edx                        # VIRTIO_BLK_T_OUT
        xor     %ecx, %ecx
        xor     %r8d, %r8d
        call    blk_request
        lea     msg_blk_write_failed(%rip), %rdi
        test    %eax, %eax
        jnz     fail
        mov     $4, %edx                        # VIRTIO_BLK_T_FLUSH
        xor     %ecx, %ecx
        xor     %r8d, %r8d
        call    blk_request
        lea     msg_blk_flush_failed(%rip), %rdi
        test    %eax, %eax
        jnz     fail
        lea     msg_blk_written(%rip), %rdi
        call    puts
        ret

# console_test: the agent's console at %r12, multiport as Linux drives it: DEVICE_READY,
# PORT_ADD(1), PORT_READY(1), PORT_NAME(1, "mvm.agent") and PORT_OPEN(1); then a round trip on
# port 1 (queues 4 and 5): sends a ping, waits for the host's answer, sends it back.
console_test:
        mov     $2, %r8d                        # VIRTIO_CONSOLE_F_MULTIPORT
        call    dev_init
        mov     $2, %edx
        call    queue_init                      # control, device to driver
        mov     $3, %edx
        call    queue_init                      # control, driver to device
        mov     $4, %edx
        call    queue_init                      # port 1 receive
        mov     $5, %edx
        call    queue_init                      # port 1 transmit
        call    dev_ready
        xor     %r10d, %r10d                    # four control receive buffers
1:      lea     0x2000(%r13), %rsi
        mov     %r10, %rdi
        shl     $8, %rdi
        lea     CTRL_RX(%r13,%rdi), %rdi
        mov     $0x100, %edx
        mov     $DESC_F_WRITE, %r8d
        xor     %r9d, %r9d
        mov     %r10d, %ecx
        call    set_desc
        mov     $2, %edx
        mov     %r10d, %ecx
        call    virtq_post
        inc     %r10d
        cmp     $4, %r10d
        jb      1b

        xor     %edi, %edi                      # DEVICE_READY
        xor     %esi, %esi
        mov     $1, %edx
        call    ctrl_send
        mov     $2, %edx                        # -> PORT_ADD(1)
        mov     $1, %eax
        call    virtq_wait
        lea     msg_console_no_port(%rip), %rdi
        cmpl    $1, CTRL_RX(%r13)
        jne     fail
        cmpw    $1, CTRL_RX+4(%r13)
        jne     fail

        lea     0x4000(%r13), %rsi              # port 1's receive buffer: 256 bytes
        lea     CON_RX(%r13), %rdi
        mov     $256, %edx
        mov     $DESC_F_WRITE, %r8d
        xor     %r9d, %r9d
        xor     %ecx, %ecx
        call    set_desc
        mov     $4, %edx
        xor     %ecx, %ecx
        call    virtq_post

        mov     $1, %edi                        # PORT_READY(1)
        mov     $3, %esi
        mov     $1, %edx
        call    ctrl_send
        mov     $2, %edx                        # -> PORT_NAME(1), PORT_OPEN(1)
        mov     $3, %eax
        call    virtq_wait
        lea     msg_console_no_name(%rip), %rdi
        cmpw    $7, CTRL_RX+0x100+4(%r13)
        jne     fail
        lea     CTRL_RX+0x100+8(%r13), %rdi
        lea     port_name(%rip), %rsi
        mov     $port_name_len, %ecx
        call    memeq
        lea     msg_console_no_name(%rip), %rdi
        test    %eax, %eax
        jz      fail
        lea     msg_console_not_open(%rip), %rdi
        cmpw    $6, CTRL_RX+0x200+4(%r13)
        jne     fail
        cmpw    $1, CTRL_RX+0x200+6(%r13)
        jne     fail
        lea     msg_console_named(%rip), %rdi
        call    puts
        mov     $1, %edi                        # PORT_OPEN(1): the guest opened it
        mov     $6, %esi
        mov     $1, %edx
        call    ctrl_send

        lea     CON_TX(%r13), %rdi              # the ping
        lea     ping(%rip), %rsi
        mov     $ping_len, %ecx
        rep movsb
        lea     0x5000(%r13), %rsi
        lea     CON_TX(%r13), %rdi
        mov     $ping_len, %edx
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        xor     %ecx, %ecx
        call    set_desc
        mov     $5, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        lea     msg_console_sent(%rip), %rdi
        call    puts
        mov     $4, %edx                        # the answer
        mov     $1, %eax
        call    virtq_wait
        mov     %eax, %ebx
        lea     msg_console_short(%rip), %rdi
        cmp     $pong_len, %ebx
        jne     fail
        lea     CON_RX(%r13), %rdi
        lea     pong(%rip), %rsi
        mov     $pong_len, %ecx
        call    memeq
        lea     msg_console_bad(%rip), %rdi
        test    %eax, %eax
        jz      fail
        lea     msg_console_received(%rip), %rdi
        call    puts
        lea     CON_RX(%r13), %rdi
        movb    $0, pong_len(%rdi)
        call    puts
        lea     msg_newline(%rip), %rdi
        call    puts
        lea     0x5000(%r13), %rsi              # echo it back
        lea     CON_RX(%r13), %rdi
        mov     $pong_len, %edx
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        xor     %ecx, %ecx
        call    set_desc
        mov     $5, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        lea     msg_console_echoed(%rip), %rdi
        call    puts
        ret

# ctrl_send: sends the control message {id %edi, event %si, value %dx} on queue 3.
ctrl_send:
        mov     %edi, CTRL_TX(%r13)
        mov     %si, CTRL_TX+4(%r13)
        mov     %dx, CTRL_TX+6(%r13)
        lea     0x3000(%r13), %rsi
        lea     CTRL_TX(%r13), %rdi
        mov     $8, %edx
        xor     %r8d, %r8d
        xor     %r9d, %r9d
        xor     %ecx, %ecx
        call    set_desc
        mov     $3, %edx
        xor     %ecx, %ecx
        jmp     virtq_submit

# rng_test: asks the rng at %r12 for 32 bytes and checks they came, not all zero.
rng_test:
        xor     %r8d, %r8d
        call    dev_init
        xor     %edx, %edx
        call    queue_init
        call    dev_ready
        lea     RNG_BUF(%r13), %rdi
        movq    $0, (%rdi)
        movq    $0, 8(%rdi)
        movq    $0, 16(%rdi)
        movq    $0, 24(%rdi)
        mov     %r13, %rsi
        mov     $32, %edx
        mov     $DESC_F_WRITE, %r8d
        xor     %r9d, %r9d
        xor     %ecx, %ecx
        call    set_desc
        xor     %edx, %edx
        xor     %ecx, %ecx
        call    virtq_submit
        lea     msg_rng_short(%rip), %rdi
        cmp     $32, %eax
        jne     fail
        lea     RNG_BUF(%r13), %rsi
        mov     (%rsi), %rax
        or      8(%rsi), %rax
        or      16(%rsi), %rax
        or      24(%rsi), %rax
        lea     msg_rng_zero(%rip), %rdi
        test    %rax, %rax
        jz      fail
        lea     msg_rng(%rip), %rdi
        call    puts
        mov     RNG_BUF(%r13), %rdi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts
        ret

        .section .rodata
disk_marker:            .ascii "mvm-disk-sector-1"
        .set disk_marker_len, . - disk_marker
write_marker:           .ascii "mvm-guest-wrote-this"
        .set write_marker_len, . - write_marker
port_name:              .ascii "mvm.agent"
        .set port_name_len, . - port_name
ping:                   .ascii "ping-from-guest"
        .set ping_len, . - ping
pong:                   .ascii "pong-from-host"
        .set pong_len, . - pong
msg_hello:              .asciz "mvm-guest: virtio check\n"
msg_devices:            .asciz "mvm-guest: virtio devices="
msg_device:             .asciz "mvm-guest: device at "
msg_id:                 .asciz " id "
msg_blk_read:           .asciz "mvm-guest: blk read sector 1: "
msg_blk_ro_refused:     .asciz "mvm-guest: blk read-only disk refused a write\n"
msg_blk_written:        .asciz "mvm-guest: blk wrote and flushed sector 0\n"
msg_console_named:      .asciz "mvm-guest: console port 1 is mvm.agent, open\n"
msg_console_no_port:    .asciz "console: no PORT_ADD for port 1"
msg_console_no_name:    .asciz "console: port 1 not named mvm.agent"
msg_console_not_open:   .asciz "console: port 1 not opened by the host"
msg_console_sent:       .asciz "mvm-guest: console sent ping\n"
msg_console_received:   .asciz "mvm-guest: console received: "
msg_console_echoed:     .asciz "mvm-guest: console echoed it back\n"
msg_rng:                .asciz "mvm-guest: rng gave 32 bytes, first 8: "
msg_console_short:      .asciz "console answer length"
msg_console_bad:        .asciz "console answer bytes"
msg_rng_short:          .asciz "rng length"
msg_rng_zero:           .asciz "rng gave zeros"
msg_bad_magic:          .asciz "virtio magic"
msg_blk_read_failed:    .asciz "blk read status"
msg_blk_bad_data:       .asciz "blk read data"
msg_blk_ro_write:       .asciz "blk write to a read-only disk not refused"
msg_blk_write_failed:   .asciz "blk write status"
msg_blk_flush_failed:   .asciz "blk flush status"

