//! `rrt`: the command-line front end. Each subcommand lives in its own module; this file only
//! parses arguments, sets up logging and reports errors.

#![forbid(unsafe_code)]

mod bench;
mod convert;
mod corpus;
mod eval;
mod eval_text;
mod generate;
mod memory;
mod model_args;
mod serve;
mod sweep;
mod uptrain;
mod uptrain_plot;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rrt",
    version,
    about = "Relaxed Recursive Transformers: convert, evaluate, generate and serve"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate text from a prompt, streamed to stdout.
    Generate(generate::GenerateArgs),
    /// Perplexity of a model on a text file (per loop for a recursive model).
    Eval(eval::EvalArgs),
    /// Convert a pretrained model into a relaxed recursive one.
    Convert(convert::ConvertArgs),
    /// Perplexity of every init and of a range of LoRA ranks, in one run.
    Sweep(sweep::SweepArgs),
    /// Write general training text with a model (sequence-level distillation data).
    Corpus(corpus::CorpusArgs),
    /// Train a converted model by distillation from its source, with the early-exit loss.
    Uptrain(Box<uptrain::UptrainArgs>),
    /// Run the whole cluster (coordinator, workers, router) in this process.
    Serve(serve::ServeArgs),
    /// Measure speed (decode throughput, matmul roofline).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() {
    let cli = Cli::parse();
    rrt_model::runtime::tune_allocator();
    let result = match cli.command {
        // The server logs at info and runs its own async runtime; engines put their steps on
        // the compute pool themselves.
        Command::Serve(args) => serve::run(args),
        Command::Bench(bench::BenchCommand::Router(args)) => bench::router::run(args),
        Command::Bench(bench::BenchCommand::Chaos(args)) => bench::chaos::run(args),
        command => {
            tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| "warn".into()),
                )
                .with_writer(std::io::stderr)
                .init();
            rrt_model::runtime::on_compute_pool(|| match command {
                Command::Generate(args) => generate::run(args),
                Command::Eval(args) => eval::run(args),
                Command::Convert(args) => convert::run(args),
                Command::Corpus(args) => corpus::run(args),
                Command::Sweep(args) => sweep::run(args),
                Command::Uptrain(args) => uptrain::run(*args),
                Command::Bench(cmd) => bench::run(cmd),
                Command::Serve(_) => unreachable!("matched above"),
            })
        }
    };
    if let Err(err) = result {
        eprintln!("error: {err:#}");
        std::process::exit(1);
    }
}
