# mvm VMM test guest (after lib.S): says hello, then never ends by itself — it spins, or with
# "halt" on its command line halts with interrupts off. The host must stop it.

        .text
        .globl _start

_start:
        lea     msg_hello(%rip), %rdi
        call    puts
        mov     BP_CMD_LINE_PTR(%rsi), %eax
        cmpl    $0x746c6168, (%rax)             # "halt"
        je      halt
1:      jmp     1b

        .section .rodata
msg_hello:              .asciz "mvm-guest: spinning\n"
