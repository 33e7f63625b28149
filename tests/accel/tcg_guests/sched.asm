; Two ring-3 tasks preempted by the PIT, the way an OS kernel runs them: IRQ 0 from
; ring 3 (TSS stack switch), a kernel stack per task with TSS.ESP0 switched along, an
; address space per task (CR3 switched: the same virtual page holds each task's own
; counter), IRET back into the other task, and INT 0x80 system calls that check the
; task's registers and memory survived every preemption. Only outcomes are printed:
; how many switches and iterations happened depends on timing, the correctness does not.
%define EXIT_CODE 0x4c
%include "lib.inc"

%define PD_A        0x200000
%define PD_B        0x201000
%define PT_ID       0x202000        ; identity 0..4 MiB, user accessible
%define PT_A        0x203000
%define PT_B        0x204000
%define PRIV        0x40000000      ; per-task page
%define KSTK_A      0x1c0000
%define KSTK_B      0x1d0000
%define USTK_A      0x1e0000
%define USTK_B      0x1f0000
%define MIN_SWITCHES 4

main:
    ; page tables
    mov edi, PD_A
    xor eax, eax
    mov ecx, 5 * 1024
    rep stosd
    mov edi, PT_ID
    mov eax, 7
    mov ecx, 1024
.id:
    stosd
    add eax, 0x1000
    loop .id
    mov dword [PD_A], PT_ID | 7
    mov dword [PD_B], PT_ID | 7
    mov dword [PD_A + 0x100 * 4], PT_A | 7
    mov dword [PD_B + 0x100 * 4], PT_B | 7
    mov dword [PT_A], 0x300000 | 7
    mov dword [PT_B], 0x301000 | 7
    mov dword [0x300000], 0
    mov dword [0x301000], 0
    ; task B's first kernel stack: what the timer handler pops to enter it
    mov edi, KSTK_B - 13 * 4
    mov [task_esp + 4], edi
    xor eax, eax
    mov ecx, 8
    rep stosd                       ; popad image
    mov dword [edi], task_b         ; iret frame
    mov dword [edi + 4], SEL_UCODE
    mov dword [edi + 8], 0x202
    mov dword [edi + 12], USTK_B
    mov dword [edi + 16], SEL_UDATA
    ; PIC + PIT at about 1 kHz
    mov al, 0x11
    out 0x20, al
    mov al, 0x20
    out 0x21, al
    mov al, 0x04
    out 0x21, al
    mov al, 0x01
    out 0x21, al
    mov al, 0xfe
    out 0x21, al
    mov al, 0x34
    out 0x43, al
    mov ax, 1193
    out 0x40, al
    mov al, ah
    out 0x40, al
    mov dword [hook + 0x20 * 4], timer
    mov dword [hook + 0x80 * 4], syscall
    ; paging on, task A's address space
    mov eax, PD_A
    mov cr3, eax
    mov eax, cr0
    or eax, 0x80000000
    mov cr0, eax
    mov dword [tss + 4], KSTK_A
    mov ax, SEL_UDATA
    mov ds, ax
    mov es, ax
    mov esp, KSTK_A
    push dword SEL_UDATA
    push dword USTK_A
    push dword 0x202
    push dword SEL_UCODE
    push dword task_a
    iret

; the end, reached from the syscall of the last task to finish
finish:
    cli
    mov ax, SEL_KDATA
    mov ds, ax
    mov es, ax
    mov ss, ax
    mov esp, KSTACK - 64
    mov eax, cr0
    and eax, 0x7fffffff
    mov cr0, eax
    mov al, 0xff
    out 0x21, al
    mov esi, 0
.task:
    PRINT "task "
    mov eax, esi
    call hex8
    mov eax, [checks + esi * 4]
    cmp eax, 0x10                   ; at least 0x1000 / 0x100 system calls
    setae al
    movzx eax, al
    SHOW " checks>=16", eax
    SHOW "bad", [bad + esi * 4]
    SHOW "done with", [result + esi * 4]
    call nl
    inc esi
    cmp esi, 2
    jne .task
    mov eax, [switches]
    cmp eax, MIN_SWITCHES
    setae al
    movzx eax, al
    SHOW "switches>=4", eax
    mov eax, [0x300000]             ; each task's counter, in its own frame
    cmp eax, [final + 0]
    sete al
    movzx eax, al
    SHOW "counter A kept", eax
    mov eax, [0x301000]
    cmp eax, [final + 4]
    sete al
    movzx eax, al
    SHOW "counter B kept", eax
    call nl
    mov esi, done_msg
    call puts
    mov al, EXIT_CODE
    out 0xf4, al
    hlt

timer:
    add esp, 8                      ; vector, error: the frame is the CPU's
    pushad
    mov al, 0x20
    out 0x20, al
    inc dword [switches]
    mov ebx, [current]
    mov [task_esp + ebx * 4], esp
    xor ebx, 1
    mov [current], ebx
    mov esp, [task_esp + ebx * 4]
    mov eax, [kstack_top + ebx * 4]
    mov [tss + 4], eax
    mov eax, [pd_of + ebx * 4]
    mov cr3, eax
    popad
    iret

; INT 0x80: EAX=1 check (EBX = the task's own count of its PRIV counter, ESI = 3 times
; that); EAX=2 done (EDX = its last word). Returns to the task.
syscall:
    add esp, 8
    pushad
    mov ecx, [current]
    cmp eax, 1
    jne .done
    inc dword [checks + ecx * 4]
    cmp ebx, [PRIV]
    jne .bad
    mov eax, ebx
    imul eax, eax, 3                ; the task keeps ESI = 3 * count
    cmp esi, eax
    je .ret
.bad:
    inc dword [bad + ecx * 4]
    jmp .ret
.done:
    mov [result + ecx * 4], edx
    mov eax, [PRIV]
    mov [final + ecx * 4], eax
    inc dword [finished]
    cmp dword [finished], 2
    je finish
.ret:
    popad
    iret

; ring 3 tasks: count in their private page, keep ESI = 3 * count across preemptions
task_a:
    mov edx, 0x1000                 ; EDX: busy work that must survive preemption too
    jmp task_body
task_b:
    mov edx, 0x2000
task_body:
    xor ebx, ebx
    xor esi, esi
.loop:
    inc dword [PRIV]
    inc ebx
    add esi, 3
    rol edx, 1
    xor edx, ebx
    test ebx, 0xff
    jnz .loop
    push edx
    mov eax, 1
    int 0x80
    pop edx
    cmp ebx, 0x1000
    jb .loop
    cmp dword [switches], MIN_SWITCHES
    jb .loop
    mov edx, 0x600d
    mov eax, 2
    int 0x80
.idle:
    jmp .idle                       ; until the timer moves on

align 4
current: dd 0
switches: dd 0
finished: dd 0
task_esp: dd 0, 0
kstack_top: dd KSTK_A, KSTK_B
pd_of: dd PD_A, PD_B
checks: dd 0, 0
bad: dd 0, 0
result: dd 0, 0
final: dd 0, 0
END_IMAGE
