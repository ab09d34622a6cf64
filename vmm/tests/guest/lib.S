# Shared by the mvm VMM test guests; assembled first, so its constants are theirs too.
# Conventions: %r15 holds the zero page for the whole run; routines may clobber %rax, %rbx,
# %rcx, %rdx, %rsi, %rdi and %r8-%r11, and keep %r12-%r15.

        .code64
        .set COM1, 0x3f8
        .set COM1_LSR, 0x3fd
        .set ACPI_SLEEP_CONTROL, 0x600
        .set ACPI_RESET, 0x602
        .set SLP_EN_S5, (1 << 5) | (5 << 2)

        .set BP_ACPI_RSDP, 0x070
        .set BP_E820_ENTRIES, 0x1e8
        .set BP_BOOT_FLAG, 0x1fe
        .set BP_HEADER, 0x202
        .set BP_CMD_LINE_PTR, 0x228
        .set BP_CMDLINE_SIZE, 0x238
        .set BP_E820_TABLE, 0x2d0

        .text
# pass: prints the verdict and powers off through the ACPI sleep register (S5).
pass:
        lea     msg_ok(%rip), %rdi
        call    puts
        mov     $ACPI_SLEEP_CONTROL, %dx
        mov     $SLP_EN_S5, %al
        out     %al, %dx
        jmp     halt

# fail: prints the message in %rdi and resets through the ACPI reset register.
fail:
        push    %rdi
        lea     msg_fail(%rip), %rdi
        call    puts
        pop     %rdi
        call    puts
        lea     msg_newline(%rip), %rdi
        call    puts
        mov     $ACPI_RESET, %dx
        mov     $1, %al
        out     %al, %dx
halt:
        hlt
        jmp     halt

# putc: writes %al to COM1 once its transmitter is empty.
putc:
        push    %rdx
        push    %rax
1:      mov     $COM1_LSR, %dx
        in      %dx, %al
        test    $0x20, %al
        jz      1b
        pop     %rax
        mov     $COM1, %dx
        out     %al, %dx
        pop     %rdx
        ret

# puts: writes the NUL-terminated string at %rdi.
puts:
        push    %rdi
1:      movb    (%rdi), %al
        test    %al, %al
        jz      2f
        call    putc
        inc     %rdi
        jmp     1b
2:      pop     %rdi
        ret

# put_hex: writes %rdi as 0x-prefixed hexadecimal (no leading zeros).
put_hex:
        push    %rcx
        push    %rbx
        mov     $'0', %al
        call    putc
        mov     $'x', %al
        call    putc
        mov     $60, %ecx
        xor     %ebx, %ebx                      # a digit was printed
1:      mov     %rdi, %rax
        shr     %cl, %rax
        and     $0xf, %eax
        test    %ebx, %ebx
        jnz     2f
        test    %eax, %eax
        jnz     2f
        test    %ecx, %ecx
        jnz     3f
2:      mov     $1, %ebx
        lea     hex_digits(%rip), %rdx
        movb    (%rdx,%rax), %al
        call    putc
3:      sub     $4, %ecx
        jns     1b
        pop     %rbx
        pop     %rcx
        ret

# strlen: the length of the NUL-terminated string at %rdi, in %rax.
strlen:
        xor     %eax, %eax
1:      cmpb    $0, (%rdi,%rax)
        je      2f
        inc     %rax
        jmp     1b
2:      ret

# memeq: whether the %rcx bytes at %rdi and %rsi are equal (%eax = 1) or not (%eax = 0).
memeq:
        xor     %eax, %eax
1:      test    %rcx, %rcx
        jz      2f
        movb    (%rdi), %dl
        cmpb    (%rsi), %dl
        jne     3f
        inc     %rdi
        inc     %rsi
        dec     %rcx
        jmp     1b
2:      mov     $1, %eax
3:      ret

        .section .rodata
hex_digits:             .ascii "0123456789abcdef"
msg_ok:                 .asciz "mvm-guest: ok\n"
msg_fail:               .asciz "mvm-guest: FAIL "
msg_newline:            .asciz "\n"
