# mvm VMM test guest (after lib.S): says hello, then never ends by itself — it spins, or with
# "halt" on its command line halts with interrupts off, or with "tick" writes a line "." to
# the serial console every 256 turns of its loop (progress a host can watch). The host must stop it.

        .text
        .globl _start

_start:
        lea     msg_hello(%rip), %rdi
        call    puts
        mov     BP_CMD_LINE_PTR(%rsi), %eax
        cmpl    $0x746c6168, (%rax)             # "halt"
        je      halt
        cmpl    $0x6b636974, (%rax)             # "tick"
        je      tick
1:      jmp     1b

tick:
        xor     %ecx, %ecx
1:      inc     %ecx
        test    $0xff, %ecx
        jnz     1b
        lea     msg_tick(%rip), %rdi
        call    puts
        jmp     1b

        .section .rodata
msg_hello:              .asciz "mvm-guest: spinning\n"
msg_tick:               .asciz ".\n"
