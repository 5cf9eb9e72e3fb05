//! `storygpt-v user`: local accounts of the service (used when it runs with `--auth on`).
//! Works on the data directory's database directly, also while the server runs.

use std::io::{BufRead, IsTerminal, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};

/// Arguments of `user`.
#[derive(clap::Args)]
pub struct UserArgs {
    /// The service's data directory [default: ./data].
    #[arg(long, env = "STORYGPT_DATA_DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// The service's PostgreSQL database, when it runs with one (see `serve --database`).
    #[arg(long, env = "STORYGPT_DATABASE", global = true)]
    database: Option<String>,
    #[command(subcommand)]
    command: UserCommand,
}

#[derive(clap::Subcommand)]
enum UserCommand {
    /// Make a user. The first one is an admin and receives every character and story made
    /// before accounts (or while auth was off). Without --password-stdin a strong password is
    /// generated and printed once.
    Add {
        /// Login name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Make this user an admin (sees the whole job queue, manages users).
        #[arg(long)]
        admin: bool,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// List the users.
    List,
    /// Make an API token for a user and print it once (for scripts and containers).
    Token {
        /// The user's login name.
        name: String,
        /// What the token is for.
        #[arg(long, default_value = "command line")]
        label: String,
    },
}

/// Runs a `user` subcommand.
pub fn run(args: UserArgs) -> anyhow::Result<()> {
    let data_dir = args
        .data_dir
        .unwrap_or_else(|| PathBuf::from(server::config::DEFAULT_DATA_DIR));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let pool = match args.database.as_deref().filter(|url| !url.is_empty()) {
            Some(url) => server::db::open_url(url).await?,
            None => server::db::open(&data_dir.join("storygpt-v.db")).await?,
        };
        let result = match args.command {
            UserCommand::Add {
                name,
                admin,
                password_stdin,
            } => {
                let (password, generated) = if password_stdin {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("cannot read the password from standard input")?;
                    (line.trim_end_matches(['\r', '\n']).to_string(), false)
                } else {
                    (server::auth::new_secret(), true)
                };
                let user = server::auth::add_user(&pool, &name, &password, admin)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.detail))?;
                let role = if user.is_admin { "admin" } else { "user" };
                println!("made {role} {} (id {})", user.name, user.id);
                if generated {
                    println!("password: {password}");
                    if !std::io::stdout().is_terminal() {
                        eprintln!("(the password above is shown once; keep it somewhere safe)");
                    }
                }
                Ok(())
            }
            UserCommand::List => {
                let users = server::auth::users(&pool)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.detail))?;
                let mut out = std::io::stdout().lock();
                for u in users {
                    let role = if u.is_admin { "admin" } else { "user" };
                    writeln!(out, "{}\t{}\t{role}\t{}", u.id, u.name, u.created_at)?;
                }
                Ok(())
            }
            UserCommand::Token { name, label } => {
                let users = server::auth::users(&pool)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.detail))?;
                let Some(user) = users.iter().find(|u| u.name.eq_ignore_ascii_case(&name)) else {
                    bail!("there is no user named {name:?} (`storygpt-v user list` lists them)");
                };
                let token = server::auth::create_token(&pool, user.id, &label)
                    .await
                    .map_err(|e| anyhow::anyhow!(e.detail))?;
                println!("{}", token.secret);
                Ok(())
            }
        };
        pool.close().await;
        result
    })
}
