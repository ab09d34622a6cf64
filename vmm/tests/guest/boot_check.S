# mvm VMM test guest (assembled after lib.S): a few hundred bytes of 64-bit code entered the way Linux's startup_64
# is (long mode, identity-mapped, %rsi = the zero page). It checks what the VMM gave it, says
# so on COM1, and ends the VM through the ACPI registers: soft-off (S5) when every check
# passed, the reset register when one failed. Nothing here is Linux; offsets are the x86 boot
# protocol's (Documentation/arch/x86/zero-page.rst, boot.rst).

        .text
        .globl _start

_start:
        mov     %rsi, %r15                      # the zero page, kept in r15
        lea     msg_hello(%rip), %rdi
        call    puts

        lea     msg_bad_boot_flag(%rip), %rdi
        cmpw    $0xaa55, BP_BOOT_FLAG(%r15)
        jne     fail
        lea     msg_bad_header(%rip), %rdi
        cmpl    $0x53726448, BP_HEADER(%r15)    # "HdrS"
        jne     fail

        # The command line: it must start with the marker, and its size must match.
        mov     BP_CMD_LINE_PTR(%r15), %r14d
        lea     msg_bad_cmdline(%rip), %rdi
        test    %r14, %r14
        jz      fail
        lea     cmdline_marker(%rip), %rsi
        mov     %r14, %rdx
1:      movb    (%rsi), %al
        test    %al, %al
        jz      2f
        cmpb    (%rdx), %al
        jne     fail
        inc     %rsi
        inc     %rdx
        jmp     1b
2:      mov     %r14, %rdi
        call    strlen
        lea     msg_bad_cmdline_size(%rip), %rdi
        cmp     BP_CMDLINE_SIZE(%r15), %eax
        jne     fail
        lea     msg_cmdline(%rip), %rdi
        call    puts
        mov     %r14, %rdi
        call    puts
        lea     msg_newline(%rip), %rdi
        call    puts

        # The e820 map: at least three entries, the first usable RAM at 0.
        movzbl  BP_E820_ENTRIES(%r15), %ebx
        lea     msg_bad_e820(%rip), %rdi
        cmp     $3, %ebx
        jb      fail
        cmpq    $0, BP_E820_TABLE(%r15)
        jne     fail
        cmpl    $1, BP_E820_TABLE+16(%r15)
        jne     fail
        lea     msg_e820(%rip), %rdi
        call    puts
        mov     %rbx, %rdi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts

        # The RSDP the zero page points at.
        mov     BP_ACPI_RSDP(%r15), %r13
        lea     msg_bad_rsdp(%rip), %rdi
        test    %r13, %r13
        jz      fail
        movabs  $0x2052545020445352, %rax       # "RSD PTR "
        cmp     (%r13), %rax
        jne     fail
        lea     msg_rsdp(%rip), %rdi
        call    puts
        mov     %r13, %rdi
        call    put_hex
        lea     msg_newline(%rip), %rdi
        call    puts

        jmp     pass

        .section .rodata
cmdline_marker:         .asciz "mvm-test-guest"
msg_hello:              .asciz "mvm-guest: hello from 64-bit mode\n"
msg_cmdline:            .asciz "mvm-guest: cmdline="
msg_e820:               .asciz "mvm-guest: e820 entries="
msg_rsdp:               .asciz "mvm-guest: rsdp="
msg_bad_boot_flag:      .asciz "boot_flag"
msg_bad_header:         .asciz "HdrS"
msg_bad_cmdline:        .asciz "cmdline marker"
msg_bad_cmdline_size:   .asciz "cmdline_size"
msg_bad_e820:           .asciz "e820"
msg_bad_rsdp:           .asciz "rsdp"
