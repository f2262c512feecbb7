// Loads GGUF files in llama.cpp (node-llama-cpp's runtime) and answers probes, as a llama.cpp user would run them:
// the GGUF's own chat template (Jinja, rendered by node-llama-cpp), its own end-of-generation tokens, greedy decoding.
// Called by peft_pipeline/export/verify.py. Reads one JSON request on stdin, writes one JSON answer on stdout:
//   in:  {entry, threads, models: [path], jobs: [{messages | text, max_tokens, forced, start}]}
//   out: {models: [{path, seconds, chat_template, results: [{prompt_ids, tokens, text, stopped, argmax, margin}]}]}
// `forced` is a token sequence evaluated teacher-forced: argmax[i] (and its top-2 logit margin) is llama.cpp's choice
// for token forced[start + i], i.e. the next-token argmax at every position from start - 1 on.
import {readFileSync} from "node:fs";
import {pathToFileURL} from "node:url";

const request = JSON.parse(readFileSync(0, "utf8"));
const {getLlama, JinjaTemplateChatWrapper, LlamaLogLevel} = await import(pathToFileURL(request.entry).href);
// An explicit thread count: the automatic one oversubscribes small shared machines (12 s vs 0.1 s for 3 tokens measured).
const llama = await getLlama({gpu: false, build: "never", skipDownload: true, maxThreads: request.threads,
                              logLevel: LlamaLogLevel.error, progressLogs: false});

function history(messages) {
    const items = messages.map(m => m.role === "assistant" ? {type: "model", response: [m.content]}
                                                           : {type: m.role === "system" ? "system" : "user", text: m.content});
    return [...items, {type: "model", response: []}];  // an empty model turn: render up to the generation prompt
}

function promptIds(model, wrapper, job) {
    if (job.messages) {
        if (!wrapper) throw new Error("the GGUF has no chat template (tokenizer.chat_template), but the prompt is a conversation");
        return wrapper.generateContextState({chatHistory: history(job.messages)}).contextText.tokenize(model.tokenizer);
    }
    const ids = model.tokenize(job.text);
    return model.tokens.shouldPrependBosToken && model.tokens.bos != null ? [model.tokens.bos, ...ids] : ids;
}

async function greedy(model, seq, ids, maxTokens) {
    const tokens = [];
    let stopped = false;
    for await (const token of seq.evaluate(ids, {temperature: 0})) {
        if (model.isEogToken(token)) { stopped = true; break; }
        tokens.push(token);
        if (tokens.length >= maxTokens) break;
    }
    return {tokens, stopped: stopped || tokens.length < maxTokens};
}

async function forcedArgmax(seq, forced, start) {
    const input = forced.map((t, i) => i >= start - 1 && i < forced.length - 1
        ? [t, {generateNext: {logits: {filter: {tokens: [], includeTop: 2}}}}] : t);
    const out = await seq.controlledEvaluate(input);
    const argmax = [], margin = [];
    for (let i = start - 1; i < forced.length - 1; i++) {
        const top = [...out[i].next.logits.entries()];
        argmax.push(top[0][0]);
        margin.push(top.length > 1 ? top[0][1] - top[1][1] : null);
    }
    return {argmax, margin};
}

const answer = {models: []};
for (const path of request.models) {
    const started = Date.now();
    const model = await llama.loadModel({modelPath: path});
    const template = model.fileInfo.metadata?.tokenizer?.chat_template ?? null;
    const wrapper = template ? new JinjaTemplateChatWrapper({template, convertUnsupportedSystemMessagesToUserMessages: false}) : null;
    const longest = Math.max(...request.jobs.map(j => (j.forced?.length ?? 0) + (j.max_tokens ?? 0) + 64), 256);
    const context = await model.createContext({contextSize: Math.min(4096, longest * 2), threads: request.threads, sequences: 1});
    const seq = context.getSequence();
    const results = [];
    const spent = {load: (Date.now() - started) / 1000, generate: 0, forced: 0};
    for (const job of request.jobs) {
        const prompt_ids = promptIds(model, wrapper, job);
        let t = Date.now();
        await seq.clearHistory();
        const gen = await greedy(model, seq, prompt_ids, job.max_tokens);
        const result = {prompt_ids, ...gen, text: model.detokenize(gen.tokens)};
        spent.generate += (Date.now() - t) / 1000;
        if (job.forced) {
            t = Date.now();
            await seq.clearHistory();
            Object.assign(result, await forcedArgmax(seq, job.forced, job.start));
            spent.forced += (Date.now() - t) / 1000;
        }
        results.push(result);
    }
    answer.models.push({path, seconds: (Date.now() - started) / 1000, spent, chat_template: template, results});
    await context.dispose();
    await model.dispose();
}
process.stdout.write(JSON.stringify(answer));
await llama.dispose();
